"""`jest-pod demo` orchestration on a --limit 60 build with a few steps (hidden --scale smoke)."""

import json
import os

from jest_pod.experiments import demo


def test_demo_smoke_runs_all_stages_and_resumes(tmp_path, capsys):
  data, workdir = str(tmp_path / "data"), str(tmp_path / "wd")
  argv = ["--scale", "smoke", "--data", data, "--workdir", workdir]
  assert demo.main(argv) == 0
  out = capsys.readouterr().out
  stages = ("data", "tokenizer", "reference", "reference_cache", "uniform", "jest", "report")
  for k, stage in enumerate(stages, 1):
    assert f"stage {k}/7 {stage}" in out
  assert "est. remaining" in out and "zero-shot" in out
  assert os.path.exists(os.path.join(data + "_smoke", "web", "tokenizer.model"))
  results = json.load(open(os.path.join(workdir, "demo_results.json")))
  runs = results["runs"]
  # JEST read θ* from its cache and scored without decoding its super-batch (two-phase).
  jest_log = open(os.path.join(workdir, "jest", "metrics.jsonl")).read()
  assert "time/input_phase2_s" in jest_log
  assert os.path.exists(os.path.join(workdir, demo.REFERENCE_CACHE, "meta.json"))
  plan = demo.PLANS["smoke"]
  # Same number of training examples for both learners; JEST also scored N per step.
  assert runs["uniform"]["examples"] == runs["jest"]["examples"] == plan.steps * plan.batch
  assert runs["jest"]["examples_scored"] == plan.steps * runs["jest"]["super_batch"]
  assert runs["jest"]["flops"] > runs["uniform"]["flops"] > 0
  assert runs["jest"]["flops_incl_reference_training"] > runs["jest"]["flops"]
  for name in ("uniform", "jest"):
    assert 0.0 <= runs[name]["zero_shot_top1"] <= 1.0
    assert 0.0 <= runs[name]["img2txt_recall@1"] <= 1.0
  assert os.path.getsize(os.path.join(workdir, "demo_curves.png")) > 1000
  # The wall-clock view: each run's training seconds, in the table and in every reach note.
  assert all(runs[n]["seconds"] > 0 for n in ("uniform", "jest", "reference"))
  assert "seconds" in results["table"].splitlines()[0]
  for short, hit in results["reaches_uniform"]["jest"].items():
    assert hit is None or 0 <= hit["seconds"] <= runs["jest"]["seconds"] + 1e-6

  # A rerun skips every finished stage and rewrites the report.
  assert demo.main(argv) == 0
  out = capsys.readouterr().out
  for k, stage in enumerate(stages[:-1], 1):
    assert f"stage {k}/7 {stage} skipped (already done)" in out
  assert "stage 7/7 report done" in out

  # The public-reference walk-through adds its stages to the finished demo: a SigLIP-family
  # reference, exported to Hugging Face format, used by JEST through its own cache.
  curves = os.path.join(workdir, "demo_curves.png")
  with open(curves, "rb") as f:
    demo_figure = f.read()
  assert demo.main(argv + ["--public-reference"]) == 0
  out = capsys.readouterr().out
  # Its own figure: the demo's is left as it was (issue 32).
  assert os.path.getsize(os.path.join(workdir, "demo_curves_public_reference.png")) > 1000
  with open(curves, "rb") as f:
    assert f.read() == demo_figure
  assert "stage 7/10 siglip_reference done" in out and "stage 8/10 export+cache done" in out
  assert "stage 10/10 report done" in out and "jest_hf_reference" in out
  hf = os.path.join(workdir, demo.HF_REFERENCE)
  for name in ("config.json", "model.safetensors", "spiece.model"):
    assert os.path.exists(os.path.join(hf, name)), name
  meta = json.load(open(os.path.join(workdir, demo.HF_CACHE, "meta.json")))
  assert meta["fingerprint"]["reference"]["kind"] == "hf"
  assert meta["fingerprint"]["preprocessing"]["text_style"] == "siglip"  # not the learner's
  runs = json.load(open(os.path.join(workdir, "demo_results.json")))["runs"]
  hf_run = runs["jest_hf_reference"]
  assert hf_run["examples"] == runs["jest"]["examples"]
  assert hf_run["flops_incl_reference_training"] > hf_run["flops"] > runs["uniform"]["flops"]
  assert "select/learnability_selected" in open(
      os.path.join(workdir, "jest_hf_reference", "metrics.jsonl")).read()

  # Another plan in the same workdir is refused rather than mixed.
  assert demo.main(["--quick", "--data", data, "--workdir", workdir]) == 2

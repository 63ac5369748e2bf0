"""`jest-pod sweep`: crossing points, damage shares, and a one-seed smoke sweep end to end."""

import json
import os

import numpy as np
import pytest

from jest_pod import config as config_lib
from jest_pod.experiments import sweep
from jest_pod.train import flops as flops_lib
from jest_pod.experiments import sweep_report


def test_examples_to_reach_interpolates_between_evaluations():
  xs, ys = np.array([0.0, 100.0, 200.0]), np.array([0.1, 0.3, 0.5])
  assert sweep_report.examples_to_reach(xs, ys, 0.4) == pytest.approx(150.0)
  assert sweep_report.examples_to_reach(xs, ys, 0.3) == pytest.approx(100.0)
  assert sweep_report.examples_to_reach(xs, ys, 0.05) == 0.0
  assert sweep_report.examples_to_reach(xs, ys, 0.6) is None
  # The first crossing counts, not a later dip and recovery.
  assert sweep_report.examples_to_reach(xs, np.array([0.1, 0.5, 0.2]), 0.3) == pytest.approx(50.0)


def test_damage_shares_group_origins_by_damage_kind():
  events = [
      {"step": 10, "select/share/emoji": 0.6, "pool/share/emoji": 0.4,
       "select/share/emoji/junk_image": 0.1, "pool/share/emoji/junk_image": 0.3,
       "select/share/clip/junk_image": 0.3, "pool/share/clip/junk_image": 0.3},
      {"step": 20, "select/share/emoji": 0.4, "pool/share/emoji": 0.4,
       "select/share/emoji/junk_image": 0.3, "pool/share/emoji/junk_image": 0.3,
       "select/share/clip/junk_image": 0.3, "pool/share/clip/junk_image": 0.3},
      {"step": 20, "z/0shot/x_top1": 0.5},  # evaluations carry no shares: ignored
  ]
  shares = sweep_report._damage_shares(events)
  assert shares["clean"] == pytest.approx((0.5, 0.4))
  assert shares["junk_image"] == pytest.approx((0.5, 0.6))


def test_bad_arguments_exit_2_with_a_message(capsys):
  assert sweep.main(["--only", "f,nope"]) == 2
  assert "nope" in capsys.readouterr().err
  assert sweep.main(["--seeds", "0,x"]) == 2
  assert "--seeds" in capsys.readouterr().err


def test_smoke_sweep_trains_reports_and_resumes(tmp_path, monkeypatch, capsys):
  # Relative paths on purpose: the default workdir is relative and Orbax needs absolute.
  monkeypatch.chdir(tmp_path)
  # Children get 1 XLA CPU device each, as on a real 2-core machine (not the tests' 8 fake
  # ones, which only slow their compiles).
  monkeypatch.setenv("XLA_FLAGS", "")
  # One seed keeps this CI test light; spreads over seeds are plain mean/sd.
  argv = ["--scale", "smoke", "--data", "data", "--workdir", "wd", "--seeds", "0",
          "--only", "schedule", "--jobs", "2"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "3 runs (3 variants × 1 seeds), 0 already done; 2 at a time, 1 CPU device(s)" in out
  assert "est. remaining" in out
  results = json.load(open("wd/sweep_results.json"))
  analysis = results["analysis"]

  # The target is uniform's final zero-shot, mean over seeds, read back from the runs' logs.
  finals = []
  for seed in (0,):
    events = [json.loads(line) for line in open(f"wd/runs/uniform/seed{seed}/metrics.jsonl")]
    key, = sweep_report.metric_keys(events)["eval_fashion top-1"]
    finals.append([e for e in events if key in e][-1][key])
  assert analysis["metrics"] == ["eval_fashion top-1", "eval_retrieval R@5"]
  assert analysis["targets"]["eval_fashion top-1"] == pytest.approx(np.mean(finals))

  jest = analysis["variants"]["jest_f80"]
  assert jest["seeds"] == [0]
  # Scoring and the reference forward make a JEST step dearer than a uniform one; selecting
  # for half the steps costs in between (per step, on average).
  uniform_step = analysis["variants"]["uniform"]["flops_per_step"]
  early = analysis["variants"]["jest_f80_until50"]["flops_per_step"]
  assert jest["flops_per_step"] > early > uniform_step
  # FLOPs to reach = examples to reach × FLOPs per example; "+ref" adds the reference's
  # training for runs that use a reference only. Checked wherever a seed reached the target:
  # uniform always reaches its own seeds' mean, so the loop cannot be empty.
  ref_share = (analysis["references"]["reference"]["training_flops"]
               / analysis["uniform_flops"])
  checked = 0
  for name, row in analysis["variants"].items():
    reach = row["reach"]["eval_fashion top-1"]
    for frac, ratio, amortised, with_ref in zip(
        reach["examples_frac"], reach["flops_ratio"], reach["flops_ratio_amortised"],
        reach["flops_ratio_incl_ref"]):
      if frac is not None and name != "jest_f80_until50":  # its steps cost two amounts
        assert ratio == pytest.approx(frac * row["flops_per_step"] / uniform_step)
        # Amortised: the reference forward leaves the per-step count (cached once).
        assert amortised == pytest.approx(frac * row["flops_per_step_amortised"] / uniform_step)
        assert with_ref == pytest.approx(ratio + (0 if name == "uniform" else ref_share))
        checked += 1
  assert checked > 0
  assert jest["flops_per_step_amortised"] < jest["flops_per_step"]
  assert (analysis["variants"]["uniform"]["flops_per_step_amortised"] == uniform_step)
  assert analysis["references"]["reference"]["num_examples"] > 0
  # Wall-clock: every run's training seconds, and where a seed reached, its seconds to it.
  assert all(s > 0 for row in analysis["variants"].values() for s in row["seconds"])
  reach = jest["reach"]["eval_fashion top-1"]
  for secs, ratio in zip(reach["seconds"], reach["seconds_ratio"]):
    if secs is not None:
      assert ratio == pytest.approx(secs / analysis["uniform_totals"]["seconds"])
  assert set(jest["damage"]["0"]) >= {"clean", "swapped_caption", "junk_image"}

  # The damage table reports whichever selection runs have finished.
  assert sweep.main([*argv[:-4], "--only", "schedule,damage", "--report-only"]) == 0
  capsys.readouterr()
  report = open("wd/sweep_report.md").read()
  for label in ("| uniform |", "| JEST f=80% |", "Reference `reference`: trained with",
                "its cache, computed once", "Reaching the baseline's final eval_retrieval R@5",
                "| JEST f=80% until 50% of steps, then uniform |", "wall-clock seconds |",
                "sd / mean", "Machine: ", "swapped_caption",
                "Regenerate: `jest-pod sweep --scale smoke"):
    assert label in report
  for exp in ("schedule", "damage"):
    assert os.path.getsize(f"wd/sweep_{exp}.png") > 1000

  # A rerun trains nothing and rewrites the report.
  os.remove("wd/sweep_report.md")
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "3 already done" in out and "[sweep] start" not in out
  assert os.path.exists("wd/sweep_report.md")

  # Another plan in the same workdir is refused rather than mixed into one comparison.
  assert sweep.main(["--data", "data", "--workdir", "wd", "--report-only"]) == 2
  assert "another plan" in capsys.readouterr().err


def test_metric_keys_name_every_evaluation_set():
  events = [{"step": 1, "z/0shot/eval_flags_top1": 0.1, "z/0shot/eval_flags_top5": 0.3,
             "z/retr/eval_web_img2txt_recall@5": 0.2, "z/retr/eval_web_txt2img_recall@5": 0.4,
             "z/retr/eval_web_img2txt_recall@1": 0.1,
             "z/retr/half_img2txt_recall@5": 0.5}]  # one direction only: not a score
  keys = sweep_report.metric_keys(events)
  assert keys == {"eval_flags top-1": ("z/0shot/eval_flags_top1",),
                  "eval_web R@5": ("z/retr/eval_web_img2txt_recall@5",
                                   "z/retr/eval_web_txt2img_recall@5")}
  events.append({"step": 2, "examples": 20, "z/retr/eval_web_img2txt_recall@5": 0.6,
                 "z/retr/eval_web_txt2img_recall@5": 0.8})
  events[0]["examples"] = 10
  curve = sweep_report._series(events, keys["eval_web R@5"])
  assert curve["examples"] == [10, 20] and curve["values"] == pytest.approx([0.3, 0.7])


def test_batch_variants_train_the_same_examples_against_uniform_at_their_batch(tmp_path):
  base = sweep.make_config("icons", "jest_f80", 0, str(tmp_path / "d"), str(tmp_path))
  big = sweep.make_config("icons", "jest_f80_4xb", 0, str(tmp_path / "d"), str(tmp_path))
  assert (big.batch_size, big.total_steps) == (4 * base.batch_size, base.total_steps // 4)
  assert big.batch_size * big.total_steps == base.batch_size * base.total_steps
  assert big.selection.n_chunks == base.selection.n_chunks  # chunks of 16 instead of 4
  assert sweep.VARIANTS["jest_f80_4xb"].baseline == "uniform_4xb"
  assert sweep.VARIANTS["jest_f90_small"].baseline == "uniform_small"
  assert sweep.VARIANTS["indep_f90"].baseline == "uniform"


def test_issue_24_variants_set_distillation_references_and_schedule(tmp_path):
  """The variants beyond the paper are what their labels say, each against plain uniform."""
  make = lambda v: sweep.make_config("icons", v, 0, str(tmp_path / "d"), str(tmp_path))
  kd = make("uniform_kd")
  assert kd.selection.method == "uniform" and kd.distill.weight == 1.0
  # Uniform + KD reads θ*'s rows of its batch from the reference's cache.
  assert kd.selection.reference == str(tmp_path / "reference")
  assert kd.selection.reference_cache == str(tmp_path / "reference_cache")
  assert sweep.VARIANTS["uniform_kd"].baseline == "uniform"
  big = make("jest_f80_bigref_kd")
  assert big.distill.weight == 1.0 and big.selection.filter_ratio == 0.8
  assert big.selection.reference_cache == str(tmp_path / "reference_big_cache")
  ref = sweep.reference_config("icons", "reference_big", str(tmp_path / "d"), str(tmp_path))
  learner = make("jest_f80")
  assert (ref.model.image["width"], ref.model.image["depth"]) == (128, 4)
  assert (learner.model.image["width"], learner.model.image["depth"]) == (64, 2)
  # The same tokenizer: the learner's is the one beside its data (input.tokenizer "").
  assert learner.input.tokenizer == ""
  assert ref.input.tokenizer == os.path.join(learner.input.data, "tokenizer.model")
  early = make("jest_f80_until50")
  assert early.selection.until == 0.5 and config_lib.resolve(early).selection_steps == 390
  # Full-resolution scoring is dearer per step than Flexi's at every f.
  for f in (50, 80, 90):
    flexi, full = (flops_lib.step_flops(make(v))["scoring"] for v in (f"jest_f{f}", f"fullres_f{f}"))
    assert full > 2 * flexi  # 4× the image tokens; the text tower is the same

"""`jest-pod bench`: the step split, the selection scaling table, the score-image forms and
JEST's input paths run and print sane rows."""

import json
import os
import re
import shutil

from jest_pod.experiments import bench

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_bench_step_runs_the_real_loop_and_prints_the_comparison(tmp_path, capsys):
  # A data folder without a manifest: the benchmark builds its toy set; no reference
  # checkpoint: a 1-step run of the learner's towers, cached as a run would.
  spec = f"{CONFIGS}/jest.py:runlocal,batch=16,data={tmp_path}/none,reference={tmp_path}/none"
  assert bench.main(["step", "--config", spec, "--steps", "4", "--workdir", str(tmp_path),
                     "--xla-check"]) == 0
  out = capsys.readouterr().out
  assert "B=16 N=80" in out and "1-step run" in out and "embeddings cached" in out
  assert "two-phase input" in out
  for label in ("step (s, real loop)", "input (s/batch, all phases)", "examples/s (trained)",
                "split: selection (s)", "split: train (s)", "FLOPs/step (amortised)"):
    assert re.search(rf"^{re.escape(label)}\s+\S+\s+\S+", out, re.M), label
  ratio = re.search(r"^JEST / uniform step time: ([\d.]+)", out, re.M)
  assert ratio and float(ratio.group(1)) > 0
  # The JEST run's split has all its parts; uniform's has the train step only. JEST read
  # two-phase input: phase 2 decoded the selected records.
  assert re.search(r"^split: scoring \(s\)\s+-\s+[\d.]+", out, re.M)
  assert re.search(r"^  phase 2 \(selected\)\s+-\s+[\d.]+", out, re.M)
  # XLA's count of the train step is within 25% of the model's (measured: 3-4%).
  xla = re.search(r"XLA/model ([\d.]+)", out)
  assert xla and 0.75 < float(xla.group(1)) < 1.25
  # The reference's rows came from the cache: amortised FLOPs are below charged.
  charged = re.search(r"^FLOPs/step \(charged\)\s+(\S+)\s+(\S+)", out, re.M)
  amortised = re.search(r"^FLOPs/step \(amortised\)\s+(\S+)\s+(\S+)", out, re.M)
  assert float(amortised.group(2)) < float(charged.group(2))
  assert float(amortised.group(1)) == float(charged.group(1))

  # A run's workdir as --config benches that run's saved config and reuses its cache; a
  # uniform run's is refused like a uniform config file.
  assert bench.main(["step", "--config", str(tmp_path / "uniform")]) == 2
  assert "--config must select" in capsys.readouterr().err
  # Runs saved before config.discover_evals existed lack the key: such a workdir loads too.
  metadata, = (tmp_path / "jest" / "checkpoints").glob("*/config/metadata")
  saved = json.loads(metadata.read_text())
  del saved["discover_evals"]
  metadata.write_text(json.dumps(saved))
  again = tmp_path / "again"
  assert bench.main(["step", "--config", str(tmp_path / "jest"), "--steps", "4",
                     "--workdir", str(again)]) == 0
  out = capsys.readouterr().out
  assert f"embeddings from the config's cache {tmp_path / 'reference_cache'}" in out
  assert "B=16 N=80" in out and re.search(r"^JEST / uniform step time: [\d.]+", out, re.M)
  assert not (again / "reference_cache").exists() and (again / "jest").is_dir()


def test_bench_selection_table_and_all_rejects_options(capsys):
  assert bench.main(["selection", "--n", "256,1004", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"^\s+256\s+32\s+[\d.]+", out, re.M)
  assert "1004 skipped: N not divisible by 8 devices" in out
  assert bench.main(["all", "--repeats", "3"]) == 2
  assert bench.main(["nope"]) == 2


def test_bench_step_set_refuses_an_unknown_key(capsys):
  assert bench.main(["step", "--set", "input.no_such_key=1"]) == 2
  assert "config.input.no_such_key does not exist" in capsys.readouterr().err
  assert bench.main(["step", "--set", "input.worker_count"]) == 2


def test_bench_score_images_and_data_jest_measure_the_stored_forms_and_input_paths(
    toy, tmp_path, capsys):
  """`bench score-images` (forms, fidelity, pick overlap) and `bench data --jest` (host CPU
  per trained example) run on a toy set; exact forms keep every pick."""
  data = str(tmp_path / "toy")
  shutil.copytree(toy, data)
  assert bench.main(["score-images", "--data", data, "--image-size", "16", "--patch", "4",
                     "--score-patch", "8", "--batch", "16", "--batches", "1"]) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line.split() for line in out.splitlines()
          if line.split() and line.split()[0] in ("float32", "float16", "thumbnail")}
  assert float(rows["float32"][-1]) == 1.0 and float(rows["float16"][-2]) > 0.9999
  assert float(rows["thumbnail"][-3]) < float(rows["float16"][-3])  # min cosine
  assert bench.main(["data", "--data", data, "--jest", "0.8", "--image-size", "16",
                     "--patch", "4", "--score-patch", "8", "--max-text-len", "12",
                     "--batch", "16", "--steps", "2", "--no-virtual"]) == 0
  out = capsys.readouterr().out
  assert "built score images" in out and "built token rows" in out
  for row in ("uniform (B decoded)", "JEST, every scored example decoded",
              "JEST, two-phase input"):
    assert row in out, out

"""`jest-pod bench`: the step split and the selection scaling table run and print sane rows."""

import os
import re

from jest_pod import bench

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_bench_step_prints_the_split_and_flops(tmp_path, capsys):
  # A data folder without a manifest: the benchmark builds its toy set; no reference
  # checkpoint: random reference towers of the same cost.
  spec = f"{CONFIGS}/jest.py:runlocal,batch=16,data={tmp_path},reference={tmp_path}/none"
  assert bench.main(["step", "--config", spec, "--repeats", "1", "--warmup", "0"]) == 0
  out = capsys.readouterr().out
  assert "B=16 N=80" in out and "random reference towers" in out
  for part in ("data", "scoring", "reference", "selection", "train", "step total"):
    assert re.search(rf"^{part}\s+", out, re.M), part
  rate = re.search(r"^examples/s \(trained\)\s+([\d.]+)\s+([\d.]+)", out, re.M)
  assert rate and float(rate.group(1)) > 0 and float(rate.group(2)) > 0
  # XLA's count of the train step is within 25% of the model's (measured: 3-4%).
  flops_table = out[out.index("FLOPs per step"):]
  train = re.search(r"^train(?:[ \t]+(\S+)){5}$", flops_table, re.M)
  assert train and 0.75 < float(train.group(1)) < 1.25


def test_bench_selection_table_and_all_rejects_options(capsys):
  assert bench.main(["selection", "--n", "256,1004", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert re.search(r"^\s+256\s+32\s+[\d.]+", out, re.M)
  assert "1004 skipped: N not divisible by 8 devices" in out
  assert bench.main(["all", "--repeats", "3"]) == 2
  assert bench.main(["nope"]) == 2

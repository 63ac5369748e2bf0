"""`jest-pod plot` on synthetic run directories."""

import json
import os

import numpy as np
import pytest

from jest_pod.experiments import plot


def _run(tmp_path, name, selection, scale, metric="z/0shot/toy_top1"):
  d = tmp_path / name
  d.mkdir()
  if selection is not None:
    (d / "config.json").write_text(json.dumps({"selection": selection}))
  with open(d / "metrics.jsonl", "w") as f:
    for step in range(0, 101, 10):
      ev = {"step": step, "examples": step * 256, "flops": step * 1e12 * scale,
            "train/loss": 5.0 / (1 + step)}
      if step % 20 == 0:
        ev[metric] = 0.9 * (1 - np.exp(-step / (30 / scale)))
      f.write(json.dumps(ev) + "\n")
    f.write('{"step": 110, "exam')  # a torn last line: the run is still writing
  return str(d)


@pytest.fixture
def runs(tmp_path):
  return [_run(tmp_path, "uniform", {"method": "uniform", "score": "learnability",
                                     "filter_ratio": 0.8}, 1.0),
          _run(tmp_path, "jest80", {"method": "joint", "score": "learnability",
                                    "filter_ratio": 0.8}, 2.0),
          _run(tmp_path, "nocfg", None, 1.5)]


def test_curve_and_legend_text(runs):
  xs, ys = plot.curve(plot.read_metrics(runs[1]), "z/0shot/toy_top1", "examples")
  assert xs == [0, 5120, 10240, 15360, 20480, 25600] and ys[0] == 0.0
  assert plot.describe_run(plot.read_config(runs[1])) == "joint learnability f=0.8"
  assert plot.describe_run(plot.read_config(runs[0])) == "uniform"
  assert plot.describe_run({"selection": {"method": "independent"}}) == "independent"
  assert plot.describe_run({}) == ""


@pytest.mark.parametrize("x,log_x", [("examples", False), ("flops", True), ("steps", False)])
def test_plot_writes_png(runs, tmp_path, x, log_x):
  out = str(tmp_path / f"fig_{x}.png")
  argv = [*runs, "--metric", "z/0shot/toy_top1", "--x", x, "--output", out]
  assert plot.main(argv + (["--log-x"] if log_x else [])) == 0
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(out) > 10_000


def test_absent_metric_lists_available(runs, tmp_path, capsys):
  assert plot.main([runs[0], "--metric", "z/0shot/nope", "--output",
                    str(tmp_path / "x.png")]) == 1
  err = capsys.readouterr().err
  assert "'z/0shot/nope' was never logged" in err and "train/loss" in err
  assert "z/0shot/toy_top1" in err


def test_missing_run_dir(tmp_path, capsys):
  assert plot.main([str(tmp_path), "--metric", "m", "--output", str(tmp_path / "x.png")]) == 1
  assert "no metrics.jsonl" in capsys.readouterr().err

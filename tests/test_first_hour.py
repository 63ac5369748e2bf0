"""The first hour (issue 32, item 9): data commands end with a line saying what they wrote
and where; a stopped run says what to fix; the trainer names the run it starts, not a
method the user mistakes for a stage; the README's public-SigLIP commands fit a CPU."""

import logging
import os
import re
import types

import numpy as np
from PIL import Image

from jest_pod.data import cli as data_cli
from jest_pod.experiments import demo
from jest_pod.train import hooks
from jest_pod.train import main as train_main
from train_helpers import ROOT


def _images(folder, n=4):
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
    with open(f"{folder}/{i}.txt", "w") as f:
      f.write(f"picture {i}\n")
  return folder


def test_ingest_ends_with_what_it_wrote_and_where(tmp_path, capsys):
  out = str(tmp_path / "ds")
  assert data_cli.main(["ingest", "--input", _images(str(tmp_path / "in")), "--output", out,
                        "--workers", "1"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last == (f"jest-pod data ingest: done: {out} holds 4 examples in 1 shard(s); train "
                  f"on it with config.input.data={out}"), last


def test_a_stopped_run_says_what_to_fix(tmp_path):
  none = hooks.last_checkpoint_line(str(tmp_path))
  assert "fix that" not in none and "No checkpoint was saved yet in" in none
  assert "rerun the same command (it starts again from step 0)" in none
  os.makedirs(tmp_path / "checkpoints" / "7")
  line = hooks.last_checkpoint_line(str(tmp_path), "free space on that disk")
  assert "step 7" in line and "free space on that disk, then rerun the same command" in line
  assert "fix that" not in line


def test_the_start_line_names_the_run_not_training_uniform(caplog):
  config = types.SimpleNamespace(
      selection=types.SimpleNamespace(method="uniform", score="learnability", filter_ratio=0.8),
      distill=None, total_steps=400)
  spec = types.SimpleNamespace(selecting=False, distill=False, selection_steps=0,
                               batch_size=64, super_batch=64)
  with caplog.at_level(logging.INFO, logger="jest_pod"):
    train_main._log_start(config, spec, {"charged": 1.0, "amortised": 1.0}, 0,
                          "workdirs/demo/reference")
  assert "training uniform" not in caplog.text
  assert re.search(r"training workdirs/demo/reference: no selection", caplog.text)


def test_the_public_reference_variant_has_its_own_figure():
  assert demo.curves_name({"uniform": 0, "jest": 0}) == "demo_curves.png"
  assert demo.curves_name({"uniform": 0, "jest": 0, "jest_hf_reference": 0}) != "demo_curves.png"


def _public_siglip_section():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  start = text.index("## Use a public SigLIP as the reference")
  return text[start:text.index("\n## ", start + 1)]


def test_readme_public_siglip_commands_run_on_a_cpu_and_name_the_fixture():
  section = _public_siglip_section()
  trains = re.findall(r"jest-pod train --config (\S+)", section)
  assert trains and all(":runlocal" in c for c in trains), trains
  assert "tests/fixtures/siglip_tiny" in section


def test_a_native_crash_prints_the_python_stacks():
  """A segfault (issue 32: once in libpython during an async save) must leave the threads'
  Python stacks: `jest-pod` turns faulthandler on."""
  import subprocess
  import sys
  code = ("import ctypes, sys; from jest_pod import cli; cli.main(['--help']); "
          "ctypes.string_at(0)")  # a null read: SIGSEGV
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert done.returncode != 0 and "Fatal Python error: Segmentation fault" in done.stderr
  assert "Current thread" in done.stderr or "Thread 0x" in done.stderr

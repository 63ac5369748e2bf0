"""Configs: every file loads; bad keys and values are clear errors."""

import glob
import os
import subprocess
import sys

import pytest

from jest_pod import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads_and_validates(path):
  for arg in ("runlocal", ""):
    c = config_lib.sibling_config(path, os.path.basename(path), arg)
    if c.selection.method != "uniform":
      c.selection.reference = c.selection.reference or "somewhere"
    config_lib.validate(c)
    assert "jest-pod train --config configs/" in open(path).read()  # run command documented


def test_bad_values_name_the_key_and_choices():
  c = config_lib.base_config()
  c.selection.method = "greedy"
  with pytest.raises(ValueError, match=r"selection.method='greedy'.*'uniform', 'independent', "
                     "'joint'"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.selection.method, c.selection.reference = "joint", ""
  with pytest.raises(ValueError, match="needs a reference model"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.selection.filter_ratio = 1.0
  with pytest.raises(ValueError, match="filter_ratio"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="unknown; valid: runlocal"):
    config_lib.parse_arg("runlcal", runlocal=False)


def test_super_batch_size():
  c = config_lib.base_config()
  c.batch_size, c.selection.method = 64, "joint"
  for f, n in ((0.5, 128), (0.8, 320), (0.9, 640)):
    c.selection.filter_ratio = f
    assert config_lib.num_super_batch(c) == n


def test_cli_rejects_an_unknown_override_naming_it():
  out = subprocess.run([sys.executable, "-m", "jest_pod.cli", "train", "--config",
                        os.path.join(ROOT, "configs/siglip.py:runlocal"), "--workdir", "/tmp/x",
                        "--config.optax.learning_rate=1"], capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 2
  assert "learning_rate" in out.stderr

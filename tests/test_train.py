"""The trainer end to end on the toy data: loss falls, 1 vs 8 devices, SIGTERM resume,
NaN stop, JEST with a reference checkpoint."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jest_pod.data.toy import build_toy
from jest_pod.train import feed
from jest_pod.train import main as train_main
from train_helpers import ROOT, losses, read_metrics, tiny_config


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return build_toy(str(tmp_path_factory.mktemp("toy")), 384, noise=0.25, image_size=16)


@pytest.fixture(scope="module")
def uniform_run(toy, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uniform"))
  config = tiny_config(toy, steps=16, **{"optax.lr": 3e-3})
  train_main.train(config, workdir)
  return config, workdir


def _run_cli(config, workdir, devices, **kw):
  """`jest-pod train` in a subprocess with `devices` fake CPU devices."""
  cfg_file = os.path.join(workdir + "_config.json")
  with open(cfg_file, "w") as f:
    f.write(config.to_json())
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
  code = ("import json, sys, ml_collections; from jest_pod.train import main as m; "
          "m.setup_logging(); "
          f"c = ml_collections.ConfigDict(json.load(open({cfg_file!r}))); "
          f"m.train(c, {workdir!r})")
  return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, **kw)


def test_uniform_loss_falls_and_writes_logs_and_checkpoints(uniform_run):
  _, workdir = uniform_run
  ls = losses(workdir)
  assert len(ls) == 16
  assert np.mean(ls[-4:]) < np.mean(ls[:4]) - 0.3, ls
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert "16" in os.listdir(os.path.join(workdir, "checkpoints"))
  rec = read_metrics(workdir)[16]
  assert rec["examples"] == 16 * 32 and rec["flops"] > 0


def test_one_device_matches_eight(uniform_run, tmp_path):
  config, workdir = uniform_run
  proc = _run_cli(config, str(tmp_path / "one"), devices=1)
  assert proc.wait(timeout=600) == 0
  np.testing.assert_allclose(losses(str(tmp_path / "one")), losses(workdir), rtol=2e-4, atol=2e-4)


def test_sigterm_then_rerun_matches_uninterrupted(uniform_run, tmp_path):
  config, workdir = uniform_run
  run = str(tmp_path / "preempted")
  proc = _run_cli(config, run, devices=8)
  metrics = os.path.join(run, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 4:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  assert proc.wait(timeout=300) == 0
  steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
  assert steps and steps[-1] < 16, steps  # stopped early, with a checkpoint
  assert _run_cli(config, run, devices=8).wait(timeout=600) == 0
  np.testing.assert_allclose(losses(run), losses(workdir), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("log_every,ckpt_every,good", [(1, 1, 3), (100, 2, 2)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch,
                                                       log_every, ckpt_every, good):
  # log_every=100: the loop reads no metric back until the step-4 save, and must still
  # find the NaN of step 4 before saving it.
  config = tiny_config(toy, steps=8, ckpt_every=ckpt_every, log_every=log_every)
  to_global, calls = feed.to_global, []

  def poisoned(host_batch, sharding, keys=feed.DEVICE_KEYS):  # 4th batch: NaN images
    calls.append(1)
    if len(calls) == 4:
      host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan))
    return to_global(host_batch, sharding, keys)

  monkeypatch.setattr(feed, "to_global", poisoned)
  with pytest.raises(train_main.TrainingDiverged,
                     match=f"at step 4; .*last good checkpoint is step {good}"):
    train_main.train(config, str(tmp_path))
  from jest_pod import checkpoint
  _, params, step = checkpoint.load_params(str(tmp_path))
  assert step == good
  assert all(np.all(np.isfinite(np.asarray(p))) for p in __import__("jax").tree.leaves(params))


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_main.train(tiny_config(toy, steps=8), workdir)
  return workdir


@pytest.mark.parametrize("method,score", [("joint", "learnability"),
                                          ("independent", "easy_reference")])
def test_jest_trains_with_a_reference_and_logs_selection(toy, reference, tmp_path, method, score):
  config = tiny_config(toy, steps=3, method=method, reference=reference,
                       **{"selection.score": score, "selection.filter_ratio": 0.5})
  last = train_main.train(config, str(tmp_path))
  assert np.isfinite(last["train/loss"])
  if score == "learnability":
    assert "select/learnability_selected" in last
  assert "select/share/toy/swapped_caption" in last
  assert last["progress/examples"] == 3 * 32


def test_jest_one_device_matches_eight(toy, reference, tmp_path):
  config = tiny_config(toy, steps=3, method="joint", reference=reference,
                       **{"selection.filter_ratio": 0.5, "flexi.score_patch_size": 8,
                          "flexi.train_patch_sizes": (4, 8), "flexi.train_fractions": (0.5, 0.5)})
  procs = {d: _run_cli(config, str(tmp_path / f"d{d}"), devices=d) for d in (1, 8)}
  assert all(p.wait(timeout=600) == 0 for p in procs.values())
  m1, m8 = read_metrics(str(tmp_path / "d1")), read_metrics(str(tmp_path / "d8"))
  for step in (1, 2, 3):
    np.testing.assert_allclose(m1[step]["train/loss"], m8[step]["train/loss"], rtol=2e-4)
    np.testing.assert_allclose(m1[step]["select/learnability_selected"],
                               m8[step]["select/learnability_selected"], rtol=2e-4)


def test_missing_reference_is_a_clear_error_before_training(toy, tmp_path):
  config = tiny_config(toy, steps=2, method="joint", reference=str(tmp_path / "nope"))
  from jest_pod.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match="reference.*does not exist"):
    train_main.train(config, str(tmp_path / "run"))


def test_pod_config_shapes_train_with_fsdp_sharding(toy, tmp_path):
  """configs/pod_vit_b16.py:runlocal — the pod's code path (fsdp=2 parameter sharding,
  Flexi patches 16/32) on toy-sized towers."""
  from jest_pod import config as config_lib
  config = config_lib.sibling_config(os.path.join(ROOT, "configs", "pod_vit_b16.py"),
                                     "pod_vit_b16.py", "runlocal,method=uniform,steps=2")
  config.input.data = toy
  config.batch_size, config.input.max_text_len = 16, 12
  config.model.text["vocab_size"], config.model.text["max_len"] = 64, 12
  config.flexi.score_patch_size = 0
  config.evals = {}
  last = train_main.train(config, str(tmp_path))
  assert np.isfinite(last["train/loss"]) and last["step"] == 2

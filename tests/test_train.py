"""The trainer end to end on the toy data: loss falls, 1 vs 8 devices, SIGTERM and kill -9
resume, NaN stop, the pod config's FSDP path (JEST runs: test_train_jest.py)."""

import os
import signal
import time

import numpy as np
import pytest

from jest_pod.train import feed
from jest_pod.train import hooks
from jest_pod.train import main as train_main
from train_helpers import ROOT, losses, read_metrics, run_cli, tiny_config


@pytest.fixture(scope="module")
def uniform_run(toy, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uniform"))
  config = tiny_config(toy, steps=16, **{"optax.lr": 3e-3})
  train_main.train(config, workdir)
  return config, workdir


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
  proc = run_cli(config, str(tmp_path / "one"), devices=1)
  assert proc.wait(timeout=600) == 0
  np.testing.assert_allclose(losses(str(tmp_path / "one")), losses(workdir), rtol=2e-4, atol=2e-4)


def _wait_for_lines(proc, metrics, n, timeout=300):
  """Waits until metrics.jsonl has n lines (steps logged); False if the run ended first."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= n:
      return True
    time.sleep(0.02)
  return False


def test_sigterm_and_kill_9_at_random_points_then_rerun_matches_uninterrupted(uniform_run,
                                                                             tmp_path):
  """A SIGTERM (saves at the agreed step, exits 0), then a SIGKILL at a random point (no
  handler runs: a lost VM; checkpoints every 2 steps, so kills land in saves too), then a
  rerun to the end: the losses equal the uninterrupted run's. The seed is in the message."""
  config, workdir = uniform_run
  config = config.copy_and_resolve_references()
  config.ckpt_every, config.keep_ckpts = 2, 2
  seed = int.from_bytes(os.urandom(4), "little")
  rng = np.random.default_rng(seed)
  run = str(tmp_path / "interrupted")
  metrics = os.path.join(run, "metrics.jsonl")
  ckpts = os.path.join(run, "checkpoints")

  proc = run_cli(config, run, devices=8)
  assert _wait_for_lines(proc, metrics, 4)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert steps and steps[-1] < 16, steps  # stopped early, with a checkpoint

  proc = run_cli(config, run, devices=8)
  after = len(open(metrics).readlines()) + int(rng.integers(1, 6))
  delay = float(rng.uniform(0, 0.1))
  assert _wait_for_lines(proc, metrics, after), f"seed {seed}: finished before the kill"
  time.sleep(delay)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL, f"seed {seed}: not killed"

  assert run_cli(config, run, devices=8).wait(timeout=600) == 0
  np.testing.assert_allclose(
      losses(run), losses(workdir), rtol=1e-5, atol=1e-5,
      err_msg=f"seed {seed}: killed at metric line {after} + {delay:.3f} s")


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
  with pytest.raises(hooks.TrainingDiverged,
                     match=f"at step 4; .*last good checkpoint is step {good}"):
    train_main.train(config, str(tmp_path))
  from jest_pod import checkpoint
  _, params, step = checkpoint.load_params(str(tmp_path))
  assert step == good
  assert all(np.all(np.isfinite(np.asarray(p))) for p in __import__("jax").tree.leaves(params))


def test_pod_config_shapes_train_with_fsdp_sharding(toy, tmp_path):
  """configs/pod_vit_b16.py:runlocal — the pod's code path (fsdp=2 parameter sharding,
  Flexi patches 16/32) on toy-sized towers."""
  from jest_pod import config as config_lib
  config = config_lib.load(os.path.join(ROOT, "configs", "pod_vit_b16.py"),
                           "runlocal,method=uniform,steps=2")
  config.input.data = toy
  config.batch_size, config.input.max_text_len = 16, 12
  config.model.text["vocab_size"], config.model.text["max_len"] = 64, 12
  config.flexi.score_patch_size = 0
  config.evals = {}
  last = train_main.train(config, str(tmp_path))
  assert np.isfinite(last["train/loss"]) and last["step"] == 2

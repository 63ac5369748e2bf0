"""The trainer survives what goes wrong around it: damaged checkpoints (fall back to the
previous step, moved aside), flipped bytes (the digest), a changed config on resume, a
second trainer on the same workdir, a too-small text vocabulary."""

import glob
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from jest_pod import checkpoint as ckpt_lib
from jest_pod.parallel import sharding as shd
from jest_pod.data import pipeline
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.models import build_model
from jest_pod.train import feed
from jest_pod.train import lock as lock_lib
from jest_pod.train import main as train_main
from jest_pod.train import state as state_lib
from train_helpers import read_metrics, tiny_config


@pytest.fixture(scope="module")
def base_run(toy, tmp_path_factory):
  """4 steps with checkpoints at 2 and 4 (each test damages its own copy)."""
  workdir = str(tmp_path_factory.mktemp("base"))
  train_main.train(tiny_config(toy, steps=4, ckpt_every=2), workdir)
  return workdir


def _copy(base_run, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(base_run, dst)
  return dst


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(toy, base_run,
                                                                      tmp_path):
  run = _copy(base_run, tmp_path)
  os.remove(glob.glob(f"{run}/checkpoints/4/state/d/*")[0])  # the merged OCDBT data
  # A lock left by a killed trainer on this host is taken over.
  with open(f"{run}/.lock", "w") as f:
    json.dump({"host": lock_lib.socket.gethostname(), "pid": _dead_pid()}, f)
  train_main.train(tiny_config(toy, steps=6, ckpt_every=2), run)
  names = os.listdir(f"{run}/checkpoints")
  assert [n for n in names if n.startswith("4.corrupt-")], names  # kept, not deleted
  assert {"2", "4", "6"} <= set(names)
  assert sorted(read_metrics(run)) == [1, 2, 3, 4, 5, 6]
  assert not os.path.exists(f"{run}/.lock")  # released at the end


@pytest.fixture(scope="module")
def abstract(toy):
  config = tiny_config(toy, steps=4, ckpt_every=2)
  mesh = shd.make_mesh(config.mesh)
  tx, _ = state_lib.make_optimizer(config.optax, config.total_steps)
  state, state_sh = state_lib.create_state(config, build_model(config.model), tx, mesh,
                                           jax.random.key(0))
  return config, state_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)


def _flip(path):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data), len(data) // 7):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _swap_state(step_dir):  # readable, but not the state this step saved
  shutil.rmtree(f"{step_dir}/state")
  shutil.copytree(f"{step_dir}/../2/state", f"{step_dir}/state")


DAMAGE = {
    "flipped bytes": (lambda d: _flip(glob.glob(f"{d}/state/d/*")[0]), ""),
    "other contents": (_swap_state, "differ from the digest"),
    "no _METADATA": (lambda d: os.remove(f"{d}/state/_METADATA"), "_METADATA is missing"),
    "truncated data iterator": (
        lambda d: open(glob.glob(f"{d}/data/*.json")[0], "r+b").truncate(9), "not valid JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_detects_damage_and_falls_back(base_run, abstract, tmp_path, caplog, damage):
  config, target = abstract
  run = _copy(base_run, tmp_path)
  damage_fn, message = DAMAGE[damage]
  damage_fn(f"{run}/checkpoints/4")
  data_iter = feed.SkipCounter(
      pipeline.make_train_iterator(config.input, global_batch_size=32, seed=0))
  checkpointer = ckpt_lib.Checkpointer(run, every_steps=2, keep=3)
  try:
    step, state = checkpointer.restore_latest(target, data_iter)
  finally:
    checkpointer.close()
  assert step == 2 and int(state["step"]) == 2
  assert [n for n in os.listdir(f"{run}/checkpoints") if n.startswith("4.corrupt-")]
  assert f"checkpoints/4 cannot be restored: " in caplog.text and message in caplog.text


def test_nan_right_after_resume_names_the_restored_checkpoint(toy, base_run, tmp_path,
                                                               monkeypatch):
  run = _copy(base_run, tmp_path)
  to_global = feed.to_global

  def poisoned(host_batch, sharding, keys=feed.DEVICE_KEYS):
    return to_global(dict(host_batch, image=np.full_like(host_batch["image"], np.nan)),
                     sharding, keys)

  monkeypatch.setattr(feed, "to_global", poisoned)
  with pytest.raises(train_main.TrainingDiverged, match=r"at step 5;.*checkpoints/4 may be "
                     r"damaged; move it aside"):
    train_main.train(tiny_config(toy, steps=6, ckpt_every=2), run)


def test_resume_with_a_changed_meaning_is_refused_naming_the_difference(toy, base_run,
                                                                        tmp_path):
  run = _copy(base_run, tmp_path)
  config = tiny_config(toy, steps=6, ckpt_every=2, seed=7, **{"optax.lr": 5e-3})
  with pytest.raises(ValueError, match=r"seed: 0 → 7\nRestore those values.*"
                     r"allow_config_change = \('seed',\)"):
    train_main.train(config, run)
  assert sorted(os.listdir(f"{run}/checkpoints")) == ["2", "4"]  # nothing moved aside


def test_a_busy_workdir_is_refused_naming_the_holder(toy, tmp_path):
  held = lock_lib.WorkdirLock(tmp_path)  # this live test process holds it
  held.acquire()
  try:
    with pytest.raises(lock_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
      train_main.train(tiny_config(toy, steps=2), str(tmp_path))
    assert os.path.exists(tmp_path / ".lock")  # the refused trainer left it alone
  finally:
    held.release()
  assert not os.path.exists(tmp_path / ".lock")


def test_tokenizer_larger_than_the_model_vocab_is_refused(toy, tmp_path):
  config = tiny_config(toy, steps=2, **{"model.text": dict(
      vocab_size=8, max_len=12, width=32, depth=1, num_heads=2, mlp_dim=64)})
  with pytest.raises(tokenizer_lib.TokenizerError, match="vocab_size=8 is smaller"):
    train_main.train(config, str(tmp_path))


def test_sigterm_during_evaluation_saves_without_finishing_it(toy, tmp_path, monkeypatch):
  """A preemption notice during an in-run evaluation interrupts it between batches; the
  checkpoint is saved at once and the rerun resumes from it."""
  import signal
  from jest_pod.evaluators import base
  real_run, calls = base.Evaluator.run, []

  def run(self, params, should_stop=None):
    os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives as the evaluation starts
    calls.append(self.name)
    return real_run(self, params, should_stop=should_stop)

  monkeypatch.setattr(base.Evaluator, "run", run)
  evals = {"toy_retrieval": {"type": "retrieval", "data": toy, "batch_size": 16,
                             "every_steps": 2}}
  workdir = str(tmp_path / "run")
  last = train_main.train(tiny_config(toy, steps=6, evals=evals), workdir)
  assert last.get("preempted") and calls == ["toy_retrieval"]
  assert ckpt_lib.Checkpointer(workdir, every_steps=1, keep=2).latest_step() == 2
  assert not any("r/" in k or "retrieval" in k for k in read_metrics(workdir)[2])

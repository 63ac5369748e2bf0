"""The trainer survives what goes wrong around it: damaged checkpoints (fall back to the
previous step, moved aside), flipped bytes (the digest), a changed config on resume, a
second trainer on the same workdir, a too-small text vocabulary; and it refuses what
cannot work up front (a super-batch beyond host memory), warns of a data set smaller than
a batch, and ends storage failures (a bad workdir, a full disk or a read-only checkpoints
folder mid-run) and Ctrl-C in one line that says how to resume."""

import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jest_pod import checkpoint as ckpt_lib
from jest_pod import config as config_lib
from jest_pod import errors
from jest_pod.parallel import sharding as shd
from jest_pod.data import pipeline
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.models import build_model
from jest_pod.train import feed
from jest_pod.train import hooks
from jest_pod.train import lock as lock_lib
from jest_pod.train import main as train_main
from jest_pod.train import state as state_lib
from train_helpers import ROOT, read_metrics, tiny_config


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
    json.dump({"host": socket.gethostname(), "pid": _dead_pid()}, f)
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


def _restore_latest(run, config, target):
  """(step, state) the trainer's restore finds in `run` (its fallback included)."""
  data_iter = feed.SkipCounter(
      pipeline.make_train_iterator(config.input, global_batch_size=32, seed=0))
  checkpointer = ckpt_lib.Checkpointer(run, every_steps=2, keep=3)
  try:
    return checkpointer.restore_latest(target, data_iter)
  finally:
    checkpointer.close()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_detects_damage_and_falls_back(base_run, abstract, tmp_path, caplog, damage):
  config, target = abstract
  run = _copy(base_run, tmp_path)
  damage_fn, message = DAMAGE[damage]
  damage_fn(f"{run}/checkpoints/4")
  step, state = _restore_latest(run, config, target)
  assert step == 2 and int(state["step"]) == 2
  assert [n for n in os.listdir(f"{run}/checkpoints") if n.startswith("4.corrupt-")]
  assert "checkpoints/4 cannot be restored: " in caplog.text and message in caplog.text


def _rewrite_state(step_dir, change, *, new_digest=False):
  """Write `change(state)` (numpy leaves) as the step's state: readable, as Orbax writes
  it; the digest is the one saved with the old state unless `new_digest`."""
  import orbax.checkpoint as ocp
  handler = ocp.StandardCheckpointHandler()
  with ocp.Checkpointer(handler) as ckptr:
    state = jax.tree.map(np.asarray, ckptr.restore(f"{step_dir}/state"))
  state = change(state)
  shutil.rmtree(f"{step_dir}/state")
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(f"{step_dir}/state", args=ocp.args.StandardSave(state))
  if new_digest:
    with open(f"{step_dir}/digest/metadata", "w") as f:
      json.dump({"fingerprint": ckpt_lib.fingerprint(state).tolist(),
                 "kind": ckpt_lib.FINGERPRINT_KIND}, f)
  return state


def _swap_blocks(state):  # two 1,024-value blocks of one leaf trade places
  w = state["params"]["txt"]["embedding"]["embedding"]
  flat = w.reshape(-1).copy()
  flat[:1024], flat[1024:2048] = flat[1024:2048].copy(), flat[:1024].copy()
  state["params"]["txt"]["embedding"]["embedding"] = flat.reshape(w.shape)
  return state


def _swap_max_min(state):
  w = state["params"]["img"]["head"]["kernel"]
  flat = w.reshape(-1).copy()
  i, j = flat.argmax(), flat.argmin()
  flat[i], flat[j] = flat[j], flat[i]
  state["params"]["img"]["head"]["kernel"] = flat.reshape(w.shape)
  return state


@pytest.mark.parametrize("change", [_swap_blocks, _swap_max_min])
def test_the_digest_sees_a_reordered_leaf(base_run, abstract, tmp_path, caplog, change):
  """issue 32: swapping two 1,024-value blocks inside one leaf, or a leaf's max and min,
  passed the per-leaf sums; the content hash refuses both, in every reader, and the
  trainer falls back to the last good step."""
  config, target = abstract
  run = _copy(base_run, tmp_path)
  _rewrite_state(f"{run}/checkpoints/4", change)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"checkpoints/4 is damaged: contents "
                     r"differ from the digest .*(embedding|head)") as e:
    ckpt_lib.load_params(run)
  assert "\n" not in str(e.value)
  step, _ = _restore_latest(run, config, target)
  assert step == 2 and "differ from the digest" in caplog.text


def test_the_digest_is_exact_on_any_mesh_and_legacy_digests_still_verify(base_run, tmp_path):
  """The hash sums integers, so it is equal on 1 and 8 devices (float sums were not); a
  checkpoint written before it (float sums, LEGACY_KIND) still loads and is still checked."""
  state = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64) / 7, "s": np.int32(3),
           "h": np.ones(8, jax.numpy.bfloat16)}
  one = ckpt_lib.fingerprint(state)
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  spread = jax.device_put(state["w"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  assert (ckpt_lib.fingerprint({**state, "w": spread}) == one).all()
  assert one.dtype == np.uint32 and one.shape == (3, 2)
  run = _copy(base_run, tmp_path)
  step_dir = f"{run}/checkpoints/4"
  saved = _rewrite_state(step_dir, lambda s: s)  # the same state, rewritten
  sums = np.asarray(ckpt_lib._legacy_sums(saved))  # pylint: disable=protected-access
  with open(f"{step_dir}/digest/metadata", "w") as f:
    json.dump({"fingerprint": sums.tolist(), "kind": ckpt_lib.LEGACY_KIND}, f)
  assert ckpt_lib.load_params(run)[2] == 4
  _rewrite_state(step_dir, lambda s: jax.tree.map(lambda x: x * 2 if x.ndim else x, s))
  with pytest.raises(ckpt_lib.CheckpointError, match="differ from the digest"):
    ckpt_lib.load_params(run)


def test_a_damaged_checkpoint_read_is_one_line_without_a_tensorstore_dump(toy, base_run,
                                                                          tmp_path):
  """issue 32: flipped, truncated or deleted state files ended in a 61-123-line TensorStore
  dump (its JSON spec, and asyncio's 'Task exception was never retrieved' per array)."""
  run = _copy(base_run, tmp_path)
  for step in (2, 4):
    _flip(glob.glob(f"{run}/checkpoints/{step}/state/d/*")[0])
  with pytest.raises(ckpt_lib.CheckpointError, match=r"could not read the state of "
                     r"checkpoint .*checkpoints/4 \(ValueError: .*\): it is damaged") as e:
    ckpt_lib.load_params(run)
  assert "tensorstore_spec" not in str(e.value) and len(str(e.value)) < 700
  proc = _jest_pod_train(tiny_config(toy, steps=6, ckpt_every=2), run, tmp_path,
                         stderr=subprocess.PIPE)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 1
  last = _last_line(err)
  assert last.startswith("jest-pod train: error: no checkpoint under") and "step 2:" in last
  assert "tensorstore_spec" not in err and "never retrieved" not in err, err[-3000:]
  assert len(err.splitlines()) < 12, err[-3000:]


def test_nan_right_after_resume_names_the_restored_checkpoint(toy, base_run, tmp_path,
                                                               monkeypatch):
  run = _copy(base_run, tmp_path)
  to_global = feed.to_global

  def poisoned(host_batch, sharding, keys=feed.DEVICE_KEYS):
    return to_global(dict(host_batch, image=np.full_like(host_batch["image"], np.nan)),
                     sharding, keys)

  monkeypatch.setattr(feed, "to_global", poisoned)
  with pytest.raises(hooks.TrainingDiverged, match=r"at step 5;.*checkpoints/4 may be "
                     r"damaged; move it aside"):
    train_main.train(tiny_config(toy, steps=6, ckpt_every=2), run)


class _NoCheckpoints:  # what NanGuard asks of the Checkpointer, before the first save
  def wait(self):
    pass

  def latest_step(self):
    return None


def test_nan_guard_runs_before_an_evaluation_and_never_says_step_none():
  """issue 32: a run whose parameters went NaN logged evaluations of 1.0 before the guard
  (at log and save steps only) stopped it; and the message said 'step None'."""
  import types
  from jest_pod.train import loop
  guard = loop.NanGuard(types.SimpleNamespace(log_every=100), _NoCheckpoints(), "/w/checkpoints",
                        start=0)
  guard.add(3, {"train/loss": np.float32(np.nan), "train/param_norm": np.float32(np.nan)}, {})
  ran = []
  ev = types.SimpleNamespace(every_steps=3, name="e",
                             run=lambda params, should_stop: ran.append(1) or {"z/x": 1.0})
  with pytest.raises(hooks.TrainingDiverged, match=r"at step 3; .*No checkpoint was saved "
                     r"yet in /w/checkpoints") as e:
    loop.maybe_eval([ev], 3, 10, {}, preemption=None, reporter=None, clock=None,
                    preempted=False, guard=guard)
  assert not ran and "step None" not in str(e.value)
  bad = (3, 1.0, 2.0, {"select/score": float("nan")})
  message = hooks.bad_selection_message(tiny_config("/d"), bad, None, "/w/checkpoints")
  assert "step None" not in message and "no checkpoint was saved yet" in message
  assert "last good checkpoint is step 2 in /w" in hooks.bad_selection_message(
      tiny_config("/d"), bad, 2, "/w")


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


# ------------------------------------------- issue 23: refused up front, failures in one line


def _jest_pod_train(config, workdir, tmp_path, devices=1, **popen):
  """`jest-pod train` on `config` in a subprocess, as a user runs it."""
  cfg_json, cfg_py = tmp_path / "config.json", tmp_path / "config_file.py"
  cfg_json.write_text(config.to_json())
  cfg_py.write_text("import json, ml_collections\n\ndef get_config(arg=None):\n"
                    f"  return ml_collections.ConfigDict(json.load(open({str(cfg_json)!r})))\n")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "jest_pod.cli", "train", "--config",
                           str(cfg_py), "--workdir", str(workdir)], env=env, cwd=ROOT,
                          text=True, **popen)


def _last_line(stderr: str) -> str:
  assert "Traceback" not in stderr, stderr
  return stderr.strip().splitlines()[-1]


@contextlib.contextmanager
def _tmpfs(path, options):
  """A tmpfs at `path` (root, where mounts are allowed), else the test is skipped."""
  path.mkdir(parents=True, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"needs a tmpfs mount (root, mounts allowed): {done.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_super_batch_beyond_host_memory_is_refused_before_any_data_is_read(toy, tmp_path,
                                                                           monkeypatch):
  def read(*args, **kwargs):
    raise AssertionError("the data was read before the memory check")

  monkeypatch.setattr(config_lib, "host_memory_available", lambda: 2 * 2**30)
  monkeypatch.setattr(pipeline, "make_train_iterator", read)
  config = tiny_config(toy, method="joint", **{"selection.score": "hard_learner",
                                                "selection.filter_ratio": 0.99999})
  with pytest.raises(ValueError, match=r"filter_ratio=0\.99999 .*N=3,200,000 .*largest "
                                       r"filter_ratio that fits is 0\.99"):
    train_main.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # refused before the workdir, too


def test_a_data_set_smaller_than_one_batch_warns_once(toy, tmp_path, caplog, monkeypatch):
  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop  # the warning comes before the data is read; nothing more to run

  monkeypatch.setattr(pipeline, "make_train_iterator", stop)
  with caplog.at_level(logging.WARNING, logger="jest_pod"), pytest.raises(Stop):
    train_main.train(tiny_config(toy, steps=2, batch_size=512), str(tmp_path / "run"))
  warned = [r.getMessage() for r in caplog.records if "fewer than one batch" in r.getMessage()]
  assert len(warned) == 1 and "only 384 examples" in warned[0], warned


def test_a_workdir_that_is_a_file_or_read_only_is_one_clear_error(toy, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("not a folder")
  with pytest.raises(errors.StorageError, match=f"--workdir {afile} is a file, not a folder"):
    train_main.train(tiny_config(toy, steps=2), str(afile))
  if os.geteuid() != 0:  # modes stop a user; root needs a read-only filesystem
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    ctx = contextlib.nullcontext(ro)
  else:
    ctx = _tmpfs(tmp_path / "ro", "size=1m,ro")
  with ctx as ro:
    with pytest.raises(errors.StorageError, match=f"--workdir {ro}/run is not writable"):
      train_main.train(tiny_config(toy, steps=2), str(ro / "run"))


def test_checkpoints_unwritable_mid_run_is_one_clear_error(toy, tmp_path, monkeypatch):
  real_save = ckpt_lib.Checkpointer.save

  def save(self, step, *args, **kwargs):  # what Orbax raises when the folder turns read-only
    if step >= 4:
      raise PermissionError(13, "Permission denied", f"{self.step_dir(step)}.orbax-checkpoint-tmp")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  run = tmp_path / "run"
  with pytest.raises(errors.StorageError, match=r"Permission denied: .*checkpoints/4\.orbax.*"
                     r"last complete checkpoint is step 2 .*rerun the same command"):
    train_main.train(tiny_config(toy, steps=4, ckpt_every=2), str(run))
  assert not (run / ".lock").exists()


def _fill(folder):
  """Write zeros into `folder` until its disk is full."""
  with open(os.path.join(folder, "filler"), "wb") as f:
    try:
      while True:
        f.write(bytes(1 << 20))
        f.flush()
    except OSError:
      pass


def test_disk_full_during_a_checkpoint_save_is_one_line_and_keeps_the_last(toy, tmp_path):
  """The disk fills after checkpoint 2: the next save fails in Orbax's threads (ENOSPC),
  which log from each; the user sees one line naming the folder, the fix and the step to
  resume from. (No log step until 100: the save, not the event writer, hits it first.)"""
  with _tmpfs(tmp_path / "disk", "size=30m") as disk:
    run, log = disk / "run", tmp_path / "stderr.txt"
    with open(log, "w") as err:
      proc = _jest_pod_train(tiny_config(toy, steps=400, ckpt_every=2, log_every=100), run,
                             tmp_path, stdout=subprocess.DEVNULL, stderr=err)
      for _ in range(3000):  # until checkpoint 2 is committed (renamed from its temporary)
        if (run / "checkpoints" / "2").exists() or proc.poll() is not None:
          break
        time.sleep(0.1)
      _fill(disk)
      assert proc.wait(timeout=300) == 1
    last = _last_line(log.read_text())
    assert last.startswith("jest-pod train: error:") and "No space left on device" in last
    assert f"df -h {run}" in last and "rerun the same command" in last
    steps = [int(p) for p in os.listdir(run / "checkpoints") if p.isdigit()]
    assert steps and f"last complete checkpoint is step {max(steps)} in" in last


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(toy, tmp_path):
  import signal
  # A terminal's Ctrl-C: SIGINT at its default even when this suite runs in the
  # background (`cmd &` starts with SIGINT ignored, which the trainer then respects).
  proc = _jest_pod_train(tiny_config(toy, steps=400, ckpt_every=100), tmp_path / "run",
                         tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if " step 3/400 " in line:
      os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the process group
  assert proc.wait(timeout=300) == 130
  err = "".join(lines)
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  saved = [int(p) for p in os.listdir(tmp_path / "run" / "checkpoints") if p.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 400
  assert f"stopped by Ctrl-C: checkpoint at step {saved[0]} saved" in err
  assert "rerun the same command to resume" in err


def test_a_second_ctrl_c_stops_at_once():
  import signal
  # As at a terminal (a background run starts with SIGINT ignored: then it stays ignored).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  preemption = hooks.Preemption()
  preemption.install()
  try:
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pytest.fail("the first Ctrl-C must ask for a checkpoint, not stop at once")
    assert preemption.requested and preemption.interrupted
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preemption.uninstall()
    restored = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, outer)
  assert restored is signal.default_int_handler


def test_every_checkpoint_reader_verifies_the_digest(toy, base_run, tmp_path, capsys):
  """A step whose state was swapped for another step's (readable, but not what it saved)
  is refused by every reader — eval, embed, export, cache-reference and the trainer's
  reference — in one line naming the step folder, where before only `train` checked."""
  from jest_pod.evaluators import cli as eval_cli
  from jest_pod.interop import embed_cli, export
  from jest_pod.jest import reference as reference_lib
  run = _copy(base_run, tmp_path)
  _swap_state(f"{run}/checkpoints/4")
  step4 = os.path.join(run, "checkpoints", "4")
  for name, main in (
      ("eval", lambda: eval_cli.main([run, "--data", toy])),
      ("embed", lambda: embed_cli.main([run, "--data", toy, "--output", str(tmp_path / "e")])),
      ("export", lambda: export.main([run, "--format", "hf", "--output", str(tmp_path / "x")])),
      ("cache-reference", lambda: reference_lib.main(["--data", toy, "--reference", run,
                                                      "--output", str(tmp_path / "c")]))):
    assert main() == 1, name
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err and step4 in err, (name, err)
  assert not os.path.exists(tmp_path / "c")  # no cache built from the damaged model
  config = tiny_config(toy, steps=1, method="joint", reference=run,
                       **{"selection.reference_cache": "off"})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"config.selection.reference=.*damaged"):
    train_main.train(config, str(tmp_path / "jest"))
  # The previous step still reads (eval --step 2).
  assert eval_cli.main([run, "--step", "2", "--data", toy]) == 0


def test_a_failed_command_ends_with_its_one_line(tmp_path):
  """A save that failed mid-way leaves coroutines never awaited (Orbax's async save);
  Python's warning about them at exit must not follow the command's one error line."""
  script = (
      "import sys\n"
      "from jest_pod import errors\n"
      "async def async_save():\n"
      "  pass\n"
      "def fail():\n"
      "  global pending\n"
      "  pending = async_save()  # never awaited: collected at exit\n"
      "  raise OSError(28, 'No space left on device')\n"
      "sys.exit(errors.run_command('jest-pod train', fail))\n")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=120, cwd=tmp_path)
  assert r.returncode == 1
  assert _last_line(r.stderr).startswith("jest-pod train: error:"), r.stderr
  assert "never awaited" not in r.stderr

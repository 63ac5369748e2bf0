"""The JEST trainer as 2 real processes ("hosts") × 4 CPU devices, joined by
jax.distributed (gloo), reading two-phase input: same losses, selected ids and
in-training evaluation metrics (each host reads half the eval set) as 1 process × 8
devices; SIGTERM on one host → one agreed checkpoint, exact resume; SIGKILL → resume
from the last complete checkpoint.

Every child runs in its own process group with a deadline: a process whose peer died
can sit in a gloo collective for minutes, so on any failure the groups are SIGKILLed.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jest_pod.data import score_images
from jest_pod.data.toy import build_toy
from jest_pod.jest import reference as reference_lib
from jest_pod.train import main as train_main
from train_helpers import ROOT, losses, read_metrics, tiny_config

STEPS = 8
TIMEOUT = 240  # seconds for one launch of all processes


ROOT_TMP = []  # the module's scratch folder (for the compilation cache)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  ROOT_TMP.append(str(tmp_path_factory.mktemp("cache")))
  return build_toy(str(tmp_path_factory.mktemp("toy")), 256, noise=0.25, image_size=16)


@pytest.fixture(scope="module")
def jest_config(toy, tmp_path_factory):
  """A tiny reference (trained here, 8 devices), then the JEST config that uses it,
  through its embedding cache and two-phase input (the stores built beside the toy set):
  each host decodes its share of the selected rows, whichever host scored them."""
  reference = str(tmp_path_factory.mktemp("reference"))
  train_main.train(tiny_config(toy, steps=4), reference)
  reference_lib.build_cache(toy, reference)
  score_images.ensure(toy, score_images.Key(16, 4, 4), 12)
  return tiny_config(toy, steps=STEPS, method="joint", reference=reference,
                     log_selected_ids=True,
                     **{"selection.score": "learnability", "selection.filter_ratio": 0.5})


@pytest.fixture(scope="module")
def eval_config(jest_config, tmp_path_factory):
  """jest_config plus zero-shot and retrieval evaluations at the last step, on a small
  labelled set with repeated pictures and captions; 45 records: host 1 reads one fewer,
  and the last batches are padded."""
  data = build_toy(str(tmp_path_factory.mktemp("eval")), 45, seed=1, noise=0.3,
                   image_size=16, duplicate_images=0.3)
  c = jest_config.copy_and_resolve_references()
  c.evals = {name: {"type": name, "data": data, "every_steps": STEPS, "batch_size": 8}
             for name in ("zeroshot", "retrieval")}
  return c


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _kill_groups(procs):
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


class Run:
  """`jest-pod train` (through `main`) as `processes` processes × `devices` devices."""

  def __init__(self, config, workdir, *, processes=2, devices=4):
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    cfg_json = self.workdir + "_config.json"
    with open(cfg_json, "w") as f:
      f.write(config.to_json())
    self.cfg_py = self.workdir + "_config.py"
    with open(self.cfg_py, "w") as f:
      f.write("import json, ml_collections\n\ndef get_config():\n"
              f"  return ml_collections.ConfigDict(json.load(open({cfg_json!r})))\n")
    self.processes, self.devices = processes, devices
    self.procs, self.launches = [], 0

  def start(self):
    port = _free_port()
    self.launches += 1
    self.logs = []
    code = "import sys; from jest_pod.train import cli as m; sys.exit(m.main(sys.argv[1:]))"
    self.procs = []
    for i in range(self.processes):
      env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={self.devices}",
                 JEST_POD_INIT_TIMEOUT="120",
                 # Relaunches reuse the compiled programs (CPU compilation dominates).
                 JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT_TMP[0], "jax_cache"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
      if self.processes > 1:
        env.update(JEST_POD_COORDINATOR=f"127.0.0.1:{port}",
                   JEST_POD_NUM_PROCESSES=str(self.processes), JEST_POD_PROCESS_ID=str(i))
      log = f"{self.workdir}_p{i}_{self.launches}.log"
      self.logs.append(log)
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "--config", self.cfg_py, "--workdir", self.workdir],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True))
    return self

  def wait(self, timeout=TIMEOUT):
    """Exit codes of all processes; SIGKILLs everything left at the deadline."""
    deadline = time.time() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      _kill_groups(self.procs)
      pytest.fail(f"timed out after {timeout}s; logs:\n{self.tails()}")
    return [p.returncode for p in self.procs]

  def kill(self):
    _kill_groups(self.procs)

  def tails(self):
    return "\n".join(f"--- {log}\n" + "".join(open(log).readlines()[-15:])
                     for log in self.logs)

  def logged_steps(self):
    path = os.path.join(self.workdir, "metrics.jsonl")
    return len(open(path).readlines()) if os.path.exists(path) else 0

  def wait_for_steps(self, n, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while self.logged_steps() < n:
      if time.time() > deadline or any(p.poll() is not None for p in self.procs):
        self.kill()
        pytest.fail(f"never reached step {n}; logs:\n{self.tails()}")
      time.sleep(0.1)

  def checkpoints(self):
    root = os.path.join(self.workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []

  def selected_ids(self):
    """{step: ids} (a resumed run's later lines win)."""
    out = {}
    with open(os.path.join(self.workdir, "selected_ids.jsonl")) as f:
      for line in f:
        rec = json.loads(line)
        out[rec["step"]] = rec["ids"]
    return out

  def run(self):
    codes = self.start().wait()
    assert codes == [0] * self.processes, self.tails()
    return self


@pytest.fixture(scope="module")
def single(eval_config, tmp_path_factory):
  """The reference run: 1 process × 8 devices (this pytest process), uninterrupted."""
  run = Run(eval_config, tmp_path_factory.mktemp("x") / "single", processes=1, devices=8)
  train_main.train(eval_config, run.workdir)
  return run


@pytest.fixture(scope="module")
def two(eval_config, tmp_path_factory):
  """2 processes × 4 devices, uninterrupted."""
  return Run(eval_config, tmp_path_factory.mktemp("x") / "two").run()


def test_two_processes_match_one(single, two):
  assert len(losses(two.workdir)) == STEPS
  for run in (single, two):  # both read two-phase input
    assert "time/input_phase2_s" in read_metrics(str(run.workdir))[STEPS]
  np.testing.assert_allclose(losses(two.workdir), losses(single.workdir), rtol=2e-4,
                             atol=2e-4)
  ids1, ids2 = single.selected_ids(), two.selected_ids()
  assert sorted(ids1) == sorted(ids2) == list(range(1, STEPS + 1))
  for step in ids1:
    assert len(ids2[step]) == 32 and len(set(ids2[step])) == 32
    assert sorted(ids2[step]) == sorted(ids1[step]), step
  # Only process 0 writes the run files; both processes wrote the data iterator state.
  info = json.load(open(os.path.join(two.workdir, "run_info.json")))
  assert info["process_count"] == 2 and info["device_count"] == 8
  data = os.path.join(two.workdir, "checkpoints", str(STEPS), "data")
  assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def _eval_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {k: v for rec in map(json.loads, f) if rec["step"] == STEPS
            for k, v in rec.items() if k.startswith("z/")}


def test_two_processes_evaluate_like_one(single, two):
  """Each host embeds its share of the eval sets on the global mesh and gathers labels,
  masks, pixel and caption digests: every metric equals the 1-process run's, and the
  1-process evaluation of the 2-process run's final parameters."""
  got, want = _eval_metrics(two.workdir), _eval_metrics(single.workdir)
  assert len(want) == 2 + 6 and set(got) == set(want), (got, want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), (k, got[k], want[k])
  from jest_pod import checkpoint, evaluators
  from jest_pod.models import build_model
  from jest_pod.parallel import sharding
  config, params, step = checkpoint.load_params(two.workdir)
  assert step == STEPS
  model = build_model(config.model)
  mesh = sharding.make_mesh((("data", -1),))
  here = {k: v for ev in evaluators.build_evaluators(config, model, mesh)
          for k, v in ev.run(params).items()}
  for k in want:
    assert got[k] == pytest.approx(here[k], abs=1e-6), (k, got[k], here[k])
  # The retrieval set has repeated pictures: grouping them across hosts matters.
  assert 0 < want["z/retr/toy_img2txt_recall@10"] <= 1


def test_sigterm_one_host_then_sigkill_both_then_resume_matches(jest_config, two, tmp_path):
  """One preempted run, relaunched twice: (1) SIGTERM to process 1 only → both agree on a
  step, save one checkpoint, exit 0; (2) relaunch saving every step, SIGKILL both hosts
  (maybe mid-save); (3) relaunch → resumes from the last complete checkpoint (a left-over
  temporary step folder is ignored) and ends with the uninterrupted run's losses and ids."""
  run = Run(jest_config, tmp_path / "run").start()
  run.wait_for_steps(2)
  run.procs[1].send_signal(signal.SIGTERM)
  assert run.wait() == [0, 0], run.tails()
  steps = run.checkpoints()
  assert len(steps) == 1 and 2 <= steps[0] < STEPS - 2, steps  # one agreed step
  agreed = steps[0]
  assert run.logged_steps() == agreed
  assert "preempted: checkpoint at step" in open(run.logs[1]).read()

  every_step = jest_config.copy_and_resolve_references()
  every_step.ckpt_every = 1
  run = Run(every_step, run.workdir).start()
  run.wait_for_steps(agreed + 2)
  run.kill()  # both hosts die without warning
  steps = run.checkpoints()
  assert agreed < steps[-1] < STEPS, steps
  last = steps[-1]
  # What a save cut short leaves behind: a step folder not yet renamed into place.
  root = os.path.join(run.workdir, "checkpoints")
  partial = os.path.join(root, f"{last + 1}.orbax-checkpoint-tmp-1234567890")
  if not os.path.exists(partial):
    shutil.copytree(os.path.join(root, str(last)), partial)

  run.start()
  assert run.wait() == [0, 0], run.tails()
  resumed = re.search(rf"resumed from \S+ at step {last}\n", open(run.logs[0]).read())
  assert resumed, run.tails()
  assert run.checkpoints()[-1] == STEPS
  assert not [d for d in os.listdir(root) if "tmp" in d], os.listdir(root)
  np.testing.assert_allclose(losses(run.workdir), losses(two.workdir), rtol=1e-5, atol=1e-5)
  assert run.selected_ids() == two.selected_ids()

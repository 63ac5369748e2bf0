"""`jest-pod data cache-reference` on 2 real processes (jax.distributed over gloo on
127.0.0.1): each embeds and writes its share; the cache reads back like a 1-process build.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jest_pod.data import reference_cache
from jest_pod.data.toy import build_toy
from jest_pod.jest import reference as reference_lib
from jest_pod.train import main as train_main
from train_helpers import ROOT, tiny_config

N = 200  # not a multiple of 2 processes × batch, so the last batches are padded
TIMEOUT = 180


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(toy, ref, output, log_prefix, processes=2, devices=2):
  port = _free_port()
  code = ("import sys; from jest_pod.jest import reference as m; "
          "sys.exit(m.main(sys.argv[1:]))")
  procs, logs = [], []
  for i in range(processes):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JEST_POD_INIT_TIMEOUT="120", JEST_POD_COORDINATOR=f"127.0.0.1:{port}",
               JEST_POD_NUM_PROCESSES=str(processes), JEST_POD_PROCESS_ID=str(i))
    log = f"{log_prefix}_p{i}.log"
    logs.append(log)
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", code, "--data", toy, "--reference", ref, "--output", output,
           "--batch-size", "32"],
          env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
  deadline = time.time() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:  # a process whose peer died can hang in a collective: kill its group
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()
  tails = "\n".join(f"--- {log}\n" + open(log).read()[-3000:] for log in logs)
  return [p.returncode for p in procs], tails


def test_two_process_build_equals_one_process_build(tmp_path_factory):
  toy = build_toy(str(tmp_path_factory.mktemp("toy")), N, noise=0.25, image_size=16)
  ref = str(tmp_path_factory.mktemp("ref"))
  train_main.train(tiny_config(toy, steps=2), ref)
  one = reference_lib.build_cache(toy, ref, output=str(tmp_path_factory.mktemp("one")) + "/c")
  two = str(tmp_path_factory.mktemp("two")) + "/c"
  codes, tails = _launch(toy, ref, two, two)
  assert codes == [0, 0], tails
  meta = json.load(open(os.path.join(two, "meta.json")))
  assert meta["layout"]["process_count"] == 2
  assert meta["layout"]["rows_per_process"] % reference_cache.SHARD_ROWS == 0
  assert not os.path.exists(two + ".tmp")
  a = reference_lib.open_cache(one, data_dir=toy, reference=ref)
  b = reference_lib.open_cache(two, data_dir=toy, reference=ref)
  assert b.store.meta["fingerprint"] == a.store.meta["fingerprint"]
  for key in ("temperature", "bias"):
    assert b.store.meta[key] == a.store.meta[key]
  idx = np.arange(N)
  for x, y in zip(a.store.lookup(idx), b.store.lookup(idx)):
    np.testing.assert_allclose(y, x, atol=1e-2)  # bf16; different batch shapes per device
    assert np.all(np.linalg.norm(y, axis=1) > 0.9)  # every row written (no zero rows)

"""Tiny trainer configs over the toy data set, shared by the trainer tests."""

import json
import os
import subprocess
import sys

from jest_pod import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, *, steps=12, method="uniform", reference="", **overrides):
  """A CPU-second-sized SigLIP/JEST config: 16×16 images, depth-1 towers, B=32."""
  c = config_lib.load(os.path.join(ROOT, "configs", "jest.py"),
                      f"runlocal,steps={steps},method={method},flexi=0")
  c.input.data = data_dir
  c.input.image_size = c.model.image_size = 16
  c.input.max_text_len = 12
  c.input.worker_count = 0  # not the host-dependent default: the example order must not vary
  c.model.embed_dim = 16
  c.model.image = dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.text = dict(vocab_size=64, max_len=12, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.batch_size = 32
  c.selection.n_chunks = 4
  c.selection.reference = reference
  c.optax.warmup_steps = 2
  c.log_every, c.ckpt_every = 1, 100
  c.preemption_check_every = 1  # 8-step runs: hosts must agree at the next step
  c.evals = {}
  c.discover_evals.root = ""  # no evaluation sets either
  for key, value in overrides.items():
    config_lib.override(c, key, value)
  return c


def read_metrics(workdir):
  """{step: record} from metrics.jsonl (a resumed run's later lines win)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:
        out[rec["step"]] = rec
  return out


def losses(workdir):
  m = read_metrics(workdir)
  return [m[s]["train/loss"] for s in sorted(m)]


def run_cli(config, workdir, devices, **kw):
  """`jest-pod train` in a subprocess with `devices` fake CPU devices."""
  cfg_file = os.path.join(workdir + "_config.json")
  with open(cfg_file, "w") as f:
    f.write(config.to_json())
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
  code = ("import json, sys, ml_collections; from jest_pod.train import hooks as h, main as m; "
          "h.setup_logging(); "
          f"c = ml_collections.ConfigDict(json.load(open({cfg_file!r}))); "
          f"m.train(c, {workdir!r})")
  return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, **kw)

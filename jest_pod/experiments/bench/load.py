"""`jest-pod bench load`: loading public-format SigLIP checkpoints, and caching with one.

For each `--variant` (default B/16 and So400m/14 at 224², text length 64, vocab 32,000),
random SigLIP-family weights are saved as a training checkpoint (parameters only: no
optimizer state), exported with `jest-pod export`'s code to Hugging Face and big_vision
format, and each kind is loaded by `interop.formats.load` in a fresh process: wall time
and peak RSS (and RSS over the process's baseline after imports). `--cache-examples N`
then times `jest-pod data cache-reference` with the Hugging Face export as the reference
on N toy examples at the variant's image size (examples/s on this host's devices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from jest_pod import checkpoint
from jest_pod import config as config_lib
from jest_pod.config import variants
from jest_pod.data import tokenizer as tokenizer_lib
from jest_pod.data import toy
from jest_pod.interop import export, formats
from jest_pod.jest import reference as reference_lib
from jest_pod.models import build_model
from jest_pod.train import feed

# Peak RSS from /proc's VmHWM: getrusage's ru_maxrss survives execve, so a child would
# report its parent's peak.
_MEASURE = r"""
import json, sys, time
import jax
from jest_pod.interop import formats
def hwm():
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 2**20
jax.numpy.zeros(1).block_until_ready()
base = hwm()
t = time.perf_counter()
loaded = formats.load(sys.argv[1])
seconds = time.perf_counter() - t
n = sum(x.size for x in jax.tree.leaves(loaded.params))
print(json.dumps({"seconds": seconds, "peak_gb": hwm(), "over_baseline_gb": hwm() - base,
                  "params": int(n)}))
"""


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_random_workdir(variant: str, workdir: str, *, image_size: int, text_len: int,
                         vocab: int, tokenizer: str) -> None:
  """A step-0 training checkpoint of random SigLIP-family weights (no optimizer state)."""
  c = config_lib.base_config()
  variants.set_model(c, variant, family="siglip")
  c.input.image_size = c.model.image_size = image_size
  c.input.max_text_len = text_len
  c.input.tokenizer, c.input.text_style = tokenizer, "siglip"
  c.model.text = dict(c.model.text, vocab_size=vocab, max_len=text_len)
  model = build_model(c.model)
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 3)),
                                        jnp.zeros((1, text_len), jnp.int32))["params"])(
                                            jax.random.key(0))
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=1)
  ckpt.save(0, {"params": params, "opt_state": {}, "step": jnp.zeros((), jnp.int32)},
            feed.IteratorState({}), c, force=True)
  ckpt.close()


def main(argv):
  p = argparse.ArgumentParser(prog="jest-pod bench load", description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", action="append", default=None,
                 help="SigLIP tower size, repeatable (default: B/16 and So400m/14)")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=64)
  p.add_argument("--vocab", type=int, default=32_000)
  p.add_argument("--workdir", default=None, help="keep the checkpoints here (default: temp)")
  p.add_argument("--cache-examples", type=int, default=0,
                 help="also time cache-reference with the HF export on N toy examples")
  args = p.parse_args(argv)
  tmp = tempfile.TemporaryDirectory(prefix="jest_pod_bench_load_")
  root = args.workdir or tmp.name
  os.makedirs(root, exist_ok=True)
  # A sentencepiece model whose pieces fit the vocabulary (its size does not matter here).
  tok = os.path.join(root, "spiece")
  if not os.path.exists(tok + ".model"):
    tokenizer_lib.train_tokenizer([f"a photo of item {i} in colour {i % 13}" for i in range(500)],
                                  tok, 200)
  rows = []
  for variant in args.variant or ["B/16", "So400m/14"]:
    name = variant.replace("/", "_")
    wd, hf, bv = (os.path.join(root, f"{name}_{k}") for k in ("workdir", "hf", "bv.npz"))
    t = time.perf_counter()
    if not os.path.exists(os.path.join(wd, "checkpoints")):
      write_random_workdir(variant, wd, image_size=args.image_size, text_len=args.text_len,
                           vocab=args.vocab, tokenizer=tok + ".model")
    loaded = formats.load(wd)
    for fmt, out in (("hf", hf), ("big_vision", bv)):
      if not os.path.exists(out):
        export.export(loaded, fmt, out)
    del loaded
    print(f"{variant}: checkpoint + exports written in {time.perf_counter() - t:.0f}s", flush=True)
    for kind, path in (("workdir", wd), ("hf", hf), ("big_vision", bv)):
      out = subprocess.run([sys.executable, "-c", _MEASURE, path], capture_output=True,
                           text=True, check=False)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
      r = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append((variant, kind, r["params"] / 1e6, _size(path) / 2**30, r["seconds"],
                   r["peak_gb"], r["over_baseline_gb"]))
      print(f"  {kind:<10} {rows[-1][2]:7.1f}M params  {rows[-1][3]:5.2f} GiB on disk  load "
            f"{r['seconds']:6.1f}s  peak RSS {r['peak_gb']:5.2f} GiB "
            f"(+{r['over_baseline_gb']:.2f} over imports)", flush=True)
    if args.cache_examples:
      data = os.path.join(root, f"toy{args.image_size}_{args.cache_examples}")
      if not os.path.exists(os.path.join(data, "manifest.json")):
        toy.build_toy(data, args.cache_examples, image_size=args.image_size)
      t = time.perf_counter()
      reference_lib.build_cache(data, hf, output=os.path.join(root, f"{name}_cache"),
                                batch_size=32)
      dt = time.perf_counter() - t
      print(f"  cache-reference with the {variant} HF export: {args.cache_examples} examples "
            f"in {dt:.1f}s = {args.cache_examples / dt:.1f} examples/s (load + compile "
            "included)", flush=True)
  tmp.cleanup()
  return 0

"""`jest-pod bench selection`: joint selection time and memory vs super-batch size.

On the mesh of all local devices (rows over one "data" axis), for each N the batch is
B = N(1 − f) rounded to a multiple of n_chunks; random L2-normalised learner and
reference embeddings [N, d] are sharded by rows. Reports the median wall time of the
jitted `joint_select` after a warm-up, the per-device memory XLA plans for it
(`compiled.memory_analysis()`: temp + argument bytes), and, for comparison, what the
N×N float32 score matrix that we never build would take (total and per device).

CPU mesh: XLA_FLAGS=--xla_force_host_platform_device_count=8 jest-pod bench selection
(fake devices share the host's cores: timings there measure overheads, not speed).

--paper-shape: the paper's selection (N = 327,680, B = 32,768, d = 768, 16 chunks) on ONE
device, lowered and compiled from shapes only (nothing allocated, nothing run): reports
the memory XLA plans for it, for both losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jest_pod.jest import selection
from jest_pod.parallel import sharding as shd


def _parse(argv):
  p = argparse.ArgumentParser(prog="jest-pod bench selection", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", default="1024,4096,16384,65536",
                 help="comma-separated super-batch sizes N")
  p.add_argument("--d", type=int, default=64, help="embedding width")
  p.add_argument("--f", type=float, default=0.9, help="filter ratio: B = N(1 - f)")
  p.add_argument("--n-chunks", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--loss", default="sigmoid", choices=selection.LOSSES)
  p.add_argument("--score", default="learnability", choices=tuple(selection.SCORES))
  p.add_argument("--paper-shape", action="store_true",
                 help="only plan the paper's shape on one device (compile, don't run)")
  p.add_argument("--block-mib", type=float, default=selection.BLOCK_BYTES / 2**20,
                 help="joint_select's block_bytes budget in MiB")
  return p.parse_args(argv)


PAPER = dict(n=327_680, b=32_768, d=768, n_chunks=16)


def _paper_shape(args):
  """Planned per-device memory of the paper-shape selection on one device, not run."""
  n, b, d, n_chunks = PAPER["n"], PAPER["b"], PAPER["d"], PAPER["n_chunks"]
  block = int(args.block_mib * 2**20)
  emb = lambda: selection.Embeddings(jax.ShapeDtypeStruct((n, d), jnp.float32),
                                     jax.ShapeDtypeStruct((n, d), jnp.float32),
                                     jax.ShapeDtypeStruct((), jnp.float32),
                                     jax.ShapeDtypeStruct((), jnp.float32))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  device = jax.devices()[0]
  print(f"paper shape on 1 x {device.platform} ({device.device_kind}): N={n} B={b} d={d} "
        f"n_chunks={n_chunks} c={b // n_chunks} score={args.score} "
        f"block_bytes={args.block_mib:g} MiB (compiled, not run)")
  print(f"{'loss':>8} {'temp MiB/dev':>12} {'arg MiB/dev':>11} {'[N, c] f32 MiB':>14} "
        f"{'compile s':>9}")
  for loss in selection.LOSSES:
    fn = jax.jit(lambda k, lrn, ref, loss=loss: selection.joint_select(
        k, lrn, ref, num_select=b, n_chunks=n_chunks, score=args.score, loss=loss,
        block_bytes=block), device=device)
    t0 = time.perf_counter()
    mem = fn.lower(key, emb(), emb()).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    arg = getattr(mem, "argument_size_in_bytes", 0) if mem is not None else 0
    print(f"{loss:>8} {_mib(temp):>12.1f} {_mib(arg):>11.1f} {_mib(4 * n * b // n_chunks):>14.1f} "
          f"{compile_s:>9.1f}", flush=True)
  return 0


def _mib(nbytes):
  return nbytes / 2**20


def _embeddings(key, n, d, rows, t, b):
  """Random L2-normalised Embeddings [n, d], created directly with rows sharded."""
  def make(key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    y = x + jax.random.normal(ky, (n, d))  # correlated pairs: some positives are easy
    unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)
    return unit(x), unit(y)
  x, y = jax.jit(make, out_shardings=(rows, rows))(key)
  return selection.Embeddings(x, y, jnp.float32(t), jnp.float32(b))


def main(argv):
  args = _parse(argv)
  if args.paper_shape:
    return _paper_shape(args)
  devices = jax.devices()
  mesh = shd.make_mesh((("data", -1),))
  rows = NamedSharding(mesh, P("data"))
  print(f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}); "
        f"d={args.d} f={args.f} n_chunks={args.n_chunks} loss={args.loss} "
        f"score={args.score} repeats={args.repeats}")
  header = (f"{'N':>8} {'B':>7} {'median s':>9} {'min s':>8} {'compile s':>9} "
            f"{'temp MiB/dev':>12} {'arg MiB/dev':>11} {'NxN f32 MiB':>12} {'NxN MiB/dev':>11}")
  print(header)
  print("-" * len(header))
  for n in (int(v) for v in args.n.split(",")):
    b = max(args.n_chunks, round(n * (1 - args.f) / args.n_chunks) * args.n_chunks)
    if n % len(devices):
      print(f"{n:>8} skipped: N not divisible by {len(devices)} devices")
      continue
    key = jax.random.key(n)
    learner = _embeddings(jax.random.fold_in(key, 1), n, args.d, rows, 10.0, -10.0)
    reference = _embeddings(jax.random.fold_in(key, 2), n, args.d, rows, 10.0, -10.0)
    fn = jax.jit(lambda k, lrn, ref: selection.joint_select(
        k, lrn, ref, num_select=b, n_chunks=args.n_chunks, score=args.score,
        loss=args.loss, mesh=mesh, block_bytes=int(args.block_mib * 2**20)))
    t0 = time.perf_counter()
    compiled = fn.lower(key, learner, reference).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    arg = getattr(mem, "argument_size_in_bytes", 0) if mem is not None else 0
    compiled(key, learner, reference).block_until_ready()  # warm-up
    times = []
    for r in range(args.repeats):
      k = jax.random.fold_in(key, 100 + r)
      t0 = time.perf_counter()
      compiled(k, learner, reference).block_until_ready()
      times.append(time.perf_counter() - t0)
    full = 4 * n * n
    print(f"{n:>8} {b:>7} {statistics.median(times):>9.3f} {min(times):>8.3f} "
          f"{compile_s:>9.1f} {_mib(temp):>12.2f} {_mib(arg):>11.2f} {_mib(full):>12.1f} "
          f"{_mib(full / len(devices)):>11.1f}", flush=True)
  return 0

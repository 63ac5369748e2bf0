"""Embed a one-pass iterator of host batches on a device mesh, on any number of processes.

Shared by the evaluators (the training mesh: every host reads its share of the set) and
the reference cache (a process-local mesh: every host embeds and keeps its own rows).

Each host's batch is this host's rows of one global batch
(`jax.make_array_from_process_local_data`); the jitted encode function returns its
outputs replicated, and the host-side columns the caller needs (mask, index, labels,
digests) ride along through the same jit, so every host gets all hosts' rows in one
order without assuming which process owns which rows of the mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jest_pod.parallel import ids
from jest_pod.parallel import sharding


class EvalInterrupted(Exception):
  """`should_stop()` returned True between batches (e.g. the trainer was preempted)."""


class EmptyPass(ValueError):
  """The iterator yielded no batch at all."""


def data_axes_of(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """Mesh axes a batch is sharded over: those of training (`sharding.DATA_AXES`), or
  every axis of a mesh that has none of them (e.g. an ad-hoc eval mesh)."""
  return sharding.data_axes(mesh) or tuple(mesh.axis_names)


def params_on_mesh(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Leaves already laid out on `mesh`'s devices stay; others are replicated onto it.

  A checkpoint restored on another mesh, or host numpy params, would otherwise make the
  jitted encode fail with "incompatible devices".
  """
  devices = set(mesh.devices.flat)
  replicated = sharding.replicated(mesh)

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, replicated)
  return jax.tree.map(place, params)


def encode_fn_for(model: Any, *, image: bool, text: bool, patch_size: int | None = None):
  """(params, batch) → {"image": zimg, "text": ztxt} through the TwoTower apply contract."""
  def encode(params, batch):
    zimg, ztxt, _ = model.apply({"params": params}, batch["image"] if image else None,
                                batch["text"] if text else None, patch_size=patch_size)
    out = {}
    if image:
      out["image"] = zimg
    if text:
      out["text"] = ztxt
    return out
  return encode


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int):
  """Host arrays {key: [n, ...]}, the same on every host → this host's share (rows
  p, p + P, ...) as eval-iterator-style batches: `index` (global row), `mask`, padding at
  the end, the same number of batches on every host (as `make_eval_iterator`)."""
  pi, pc = jax.process_index(), jax.process_count()
  n = len(next(iter(arrays.values())))
  rows = np.arange(pi, n, pc)
  per_host = -(-n // pc)
  num_batches = -(-per_host // batch_size)
  for s in range(0, num_batches * batch_size, batch_size):
    take = rows[s:s + batch_size]
    batch = {k: _pad_rows(np.asarray(v)[take], batch_size) for k, v in arrays.items()}
    batch["index"] = _pad_rows(take.astype(np.int64), batch_size, fill=-1)
    batch["mask"] = (np.arange(batch_size) < len(take)).astype(np.float32)
    yield batch


def _pad_rows(x: np.ndarray, n: int, fill=0) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.full((n - len(x),) + x.shape[1:], fill, x.dtype)])


def _spans_processes(mesh: jax.sharding.Mesh) -> bool:
  return len({d.process_index for d in mesh.devices.flat}) > 1


def _local_row_multiple(batch_sharding: NamedSharding, n_shards: int) -> int:
  """How many distinct row blocks of a batch this process's devices hold."""
  index_map = batch_sharding.addressable_devices_indices_map((n_shards,))
  return len({idx[0].start for idx in index_map.values()})


def _agreed(batches: Iterable, should_stop: Callable[[], bool] | None, collective: bool):
  """`batches`, asking `should_stop()` before each batch; across processes every host
  stops, and ends, at the same batch (a host left alone in a collective would hang)."""
  it, n = iter(batches), 0
  while True:
    stop = bool(should_stop()) if should_stop is not None else False
    batch = None if stop else next(it, None)
    flags = np.array([[stop, batch is not None]], np.int32)  # (stop, has a batch)
    if collective:  # one tiny all-gather per batch: every host's flags
      flags = np.asarray(multihost_utils.process_allgather(flags[0])).reshape(-1, 2)
    if flags[:, 0].any():
      raise EvalInterrupted(f"stopped after {n} batch(es): should_stop() is True")
    if not flags[:, 1].any():
      return
    if not flags[:, 1].all():
      raise ValueError(f"hosts ran out of batches at different points (batch {n}): "
                       "every host must yield the same number of batches")
    n += 1
    yield batch


@functools.lru_cache(maxsize=64)
def _jitted(encode_fn, out_sharding):
  # One jit wrapper per (encode fn, mesh): an evaluator run every N steps compiles once.
  # `carry` (host columns) comes back replicated, in the same row order as the outputs.
  return jax.jit(lambda params, batch, carry: (encode_fn(params, batch), carry),
                 out_shardings=out_sharding)


def embed_stream(encode_fn: Callable[[Any, dict], Any], params: Any,
                 batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, *,
                 device_keys: Sequence[str], host_keys: Sequence[str] = (),
                 should_stop: Callable[[], bool] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Per batch, the global batch's outputs and host columns on this host (padding kept).

  Yields {output name: [G, ...], host key: [G, ...], "mask": [G], "index": [G] (when the
  batches have one)}: G = every host's rows of the batch, each host's padded to a
  multiple of its data shards, in the mesh's row order. On a process-local mesh that is
  this host's batch, rows [:b] in order. Outputs are `encode_fn`'s dict keys ("out" for a
  single array). int64 columns (record indices) travel as int32 words (parallel/ids.py),
  exact for any index.
  """
  axes = data_axes_of(mesh)
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  batch_sharding = NamedSharding(mesh, P(axes))
  multiple = _local_row_multiple(batch_sharding, n_shards)
  params = params_on_mesh(params, mesh)
  encode = _jitted(encode_fn, sharding.replicated(mesh))
  collective = _spans_processes(mesh)

  def put(x, b_pad):
    x = _pad_rows(np.asarray(x), b_pad)
    if x.dtype == np.int64:  # x64 is off: int32 (high, low) words, joined back below
      x = ids.split(x)
    return jax.make_array_from_process_local_data(batch_sharding, x)

  for batch in _agreed(batches, should_stop, collective):
    b = len(batch[device_keys[0]])
    b_pad = -(-b // multiple) * multiple  # any batch size works on any mesh
    host = {k: np.asarray(batch[k]) for k in host_keys}
    host["mask"] = (np.asarray(batch["mask"], np.float32) if "mask" in batch
                    else np.ones(b, np.float32))
    if "index" in batch:
      host["index"] = np.asarray(batch["index"])
    res, carried = encode(params, {k: put(batch[k], b_pad) for k in device_keys},
                          {k: put(v, b_pad) for k, v in host.items()})
    if not isinstance(res, Mapping):
      res = {"out": res}
    out = {k: np.asarray(v) for k, v in res.items()}
    for k, v in carried.items():
      out[k] = ids.join(v) if host[k].dtype == np.int64 else np.asarray(v).astype(host[k].dtype)
    yield out


def embed_batches(encode_fn: Callable[[Any, dict], Any], params: Any,
                  batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, *,
                  device_keys: Sequence[str], host_keys: Sequence[str] = (),
                  should_stop: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
  """Run `encode_fn` over a one-pass iterator on `mesh`; every host gets all real rows.

  Args:
    encode_fn: (params, {key: [b, ...]}) → pytree (usually a dict) of arrays [b, ...].
      Jitted here; the batch is sharded over `data_axes_of(mesh)`, outputs are replicated.
    params: the model parameters (replicated onto the mesh when not already on it).
    batches: this host's batches (contract of `make_eval_iterator`: `mask` float [b], 1
      real, 0 padding; `index` the global record index; every host the same number of
      batches of the same size) with `device_keys` and `host_keys`. Without `mask` every
      row is real.
    device_keys: batch keys passed to `encode_fn` (e.g. ("image",) or ("image", "text")).
    host_keys: numeric batch keys returned alongside, gathered from every host (e.g.
      ("label",)); bytes-like data must come as arrays (e.g. a digest as uint8 [b, 16]).
    should_stop: optional `() → bool`, asked before each batch is read; True (on any
      host) raises EvalInterrupted (a preempted trainer should not finish a long eval).
  Returns:
    {output leaf name: [n, ...], host key: [n, ...]}: n = the real rows of all hosts, in
    global `index` order when the batches have one (as one process reading the whole
    set), else in iterator order; padding dropped. Output names are the dict keys of
    `encode_fn`'s result ("out" if it returns one array).
  """
  parts: dict[str, list[np.ndarray]] = {}
  for got in embed_stream(encode_fn, params, batches, mesh, device_keys=device_keys,
                          host_keys=host_keys, should_stop=should_stop):
    for k, v in got.items():
      parts.setdefault(k, []).append(v)
  if not parts:
    raise EmptyPass("the iterator yielded no batches (empty data set?)")
  out = {k: np.concatenate(v) for k, v in parts.items()}
  real = out.pop("mask") > 0
  index = out.pop("index", None)
  order = np.flatnonzero(real)
  if index is not None:
    order = order[np.argsort(index[order], kind="stable")]
    if "index" in host_keys:
      out["index"] = index
  return {k: v[order] for k, v in out.items()}

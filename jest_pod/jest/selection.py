"""Joint example selection (JEST, arXiv 2406.17711): pick B of a super-batch of N.

Everything here is computed from embeddings, never from the N×N score matrix (at the
paper's B = 32k and f = 0.9, N = 320k: 410 GB in f32, on no device), except `pair_scores`, the small-N
reference for tests.

Scores of a pair (i, j), from the per-pair sigmoid loss ℓ of learner θ and reference θ*:
  learnability   L_ij = ℓ_θ(i, j) − ℓ_θ*(i, j)   (default)
  hard_learner   L_ij = ℓ_θ(i, j)
  easy_reference L_ij = −ℓ_θ*(i, j)
Batch score s(S) = Σ_{i,j∈S} L_ij; conditional score of k ∉ S
  s(k | S) = s(S ∪ {k}) − s(S) = L_kk + Σ_{j∈S} (L_kj + L_jk).

`joint_select` draws n_chunks chunks of c = B / n_chunks examples; chunk r is a
Gumbel-top-c over the unselected rows of s(k | S) (chunk 0: s(k | ∅) = L_kk), i.e.
sampling without replacement with p(k) ∝ exp(s(k | S)). A running s(k | S) per row is
updated with each chunk's embeddings (c × d), over row tiles of at most BLOCK_BYTES
per [rows, c] block, so working memory does not grow with N (beyond O(N) vectors).

Sharding: pass `mesh` and the rows are split over its data axes inside a shard_map;
the chunk embeddings are gathered with a psum of masked rows, the global Gumbel-top-c is
a local top-c + all-gather of (value, global index) + top-c, and the Gumbel noise of row
k in chunk r comes from fold_in(fold_in(key, r), k) with the GLOBAL k, so the indices
chosen are the same on any number of devices.

The softmax (CLIP) variant (`loss="softmax"`) is documented at `joint_select`.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax, shard_map
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jest_pod.jest import losses

# score name -> (weight of the learner's losses, weight of the reference's losses).
SCORES = {
    "learnability": (1.0, -1.0),
    "hard_learner": (1.0, 0.0),
    "easy_reference": (0.0, -1.0),
}
LOSSES = ("sigmoid", "softmax")


def uses_models(score: str) -> tuple[bool, bool]:
  """(uses the learner, uses the reference) of a score, from its weights in SCORES."""
  w_learner, w_reference = SCORES[score]
  return w_learner != 0.0, w_reference != 0.0


INDEPENDENT_METHODS = ("topk", "sample")
# Budget for one [rows, c] float32 block of pair terms per device. The conditional-score
# updates run over row tiles that fit it: at the paper's shape on one device (N = 327,680,
# c = 2,048) a whole [N, c] block would be 2.7 GB, and XLA plans several of them.
BLOCK_BYTES = 64 * 2**20


class Embeddings(NamedTuple):
  """One model's embeddings of a super-batch (a pytree).

  image: [N, d] L2-normalised image embeddings.
  text: [N, d] L2-normalised text embeddings.
  temperature: scalar t, the logit scale (exp of the learned t'), not its log.
  bias: scalar b (unused by the softmax loss).
  """
  image: jax.Array
  text: jax.Array
  temperature: jax.Array
  bias: jax.Array


# ---------------------------------------------------------------------------
# Arguments.

def _weighted_models(learner, reference, score):
  """[(weight, Embeddings)] of the models that `score` uses, validated."""
  if score not in SCORES:
    raise ValueError(f"score={score!r}: choose one of {', '.join(SCORES)}")
  out = []
  for name, emb, w in (("learner", learner, SCORES[score][0]),
                       ("reference", reference, SCORES[score][1])):
    if w == 0.0:
      continue
    if emb is None:
      raise ValueError(f"score={score!r} needs the {name}'s embeddings, got {name}=None")
    out.append((w, emb))
  # Each model scores pairs in its own space: the widths may differ (a public reference
  # of another size), the rows may not.
  for _, m in out:
    if m.image.ndim != 2 or m.image.shape != m.text.shape:
      raise ValueError(f"embeddings must be image [N, d] and text [N, d]; got "
                       f"{m.image.shape}, {m.text.shape}")
  rows = {m.image.shape[0] for _, m in out}
  if len(rows) != 1:
    raise ValueError(f"learner and reference embed different super-batches: {sorted(rows)} rows")
  return out


def _check_loss(loss):
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")


def _check_counts(n, num_select, n_chunks):
  """Static ints (numpy ints accepted): 0 < num_select <= n, n_chunks | num_select."""
  try:
    num_select, n_chunks = operator.index(num_select), operator.index(n_chunks)
  except TypeError:
    raise ValueError(f"num_select={num_select!r} and n_chunks={n_chunks!r} must be static "
                     "Python ints (mark them static in jax.jit)") from None
  if not 0 < num_select <= n:
    raise ValueError(f"num_select={num_select!r} must be an int in [1, N={n}]")
  if n_chunks < 1 or num_select % n_chunks:
    raise ValueError(f"num_select={num_select} must be divisible by n_chunks={n_chunks} "
                     "(chunk size c = num_select / n_chunks); pick a batch size that is a "
                     "multiple of n_chunks")
  return num_select, n_chunks


def _row_axes(mesh, data_axes, n):
  """The mesh axes that split rows, and their total size; () without a mesh."""
  if mesh is None:
    return (), 1
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of data_axes={data_axes}")
  size = math.prod(mesh.shape[a] for a in axes)
  if n % size:
    raise ValueError(f"super-batch N={n} is not divisible by the {size} row shards of "
                     f"mesh axes {axes}; make N a multiple of {size}")
  return axes, size


# ---------------------------------------------------------------------------
# Small-N reference and helpers (the trainer logs `mean_learnability`).

def _diag_sigmoid_losses(e: Embeddings):
  """[n] ℓ(k, k): the positive pair of each row, elementwise (no matrix)."""
  logits = e.temperature * jnp.sum(e.image * e.text, axis=-1) + e.bias
  return -jax.nn.log_sigmoid(logits).astype(jnp.float32)


def pair_scores(learner, reference, score="learnability"):
  """[N, N] pair score matrix L_ij of the module docstring (sigmoid). Small N / tests only.

  learner, reference: Embeddings (either may be None when `score` does not use it).
  """
  total = 0.0
  for w, m in _weighted_models(learner, reference, score):
    total = total + w * losses.sigmoid_pair_losses(m.image, m.text, m.temperature, m.bias)
  return total


def batch_score(scores_matrix, idx):
  """s(S) = Σ_{i,j∈S} L_ij. scores_matrix: [N, N]; idx: [B] indices of S. Small N only."""
  idx = jnp.asarray(idx)
  return jnp.sum(scores_matrix[idx[:, None], idx[None, :]])


def mean_diagonal_score(learner, reference, score):
  """Mean over the super-batch of the score's own L_kk (each used model's sigmoid loss of
  its positive pair, weighted by SCORES): defined for every score, so a damaged model's
  embeddings show as a non-finite value whatever the score."""
  return jnp.mean(sum(w * _diag_sigmoid_losses(m)
                      for w, m in _weighted_models(learner, reference, score)))


def mean_learnability(learner, reference, idx=None):
  """Mean of the sigmoid learnability L_kk = ℓ_θ(k, k) − ℓ_θ*(k, k).

  Over the whole super-batch, or over `idx` ([B] indices) when given. Only elementwise
  row ops and a gather, so it is safe on arrays sharded by rows inside jit.
  """
  diag = _diag_sigmoid_losses(learner) - _diag_sigmoid_losses(reference)
  if idx is not None:
    diag = diag[idx]
  return jnp.mean(diag)


# ---------------------------------------------------------------------------
# Per-shard building blocks. `axes` are the manual mesh axes; () = one shard.

def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _all_gather(x, axes):
  return lax.all_gather(x, axes, tiled=True) if axes else x


def _take_rows(arrays, gidx, lo, n_loc, axes):
  """Rows `gidx` (global, [m]; -1 = none) of row-sharded arrays, replicated.

  Each shard contributes the rows it owns, zeros elsewhere; the psum is exact (x + 0).
  """
  local = gidx - lo
  inside = (gidx >= 0) & (local >= 0) & (local < n_loc)
  safe = jnp.clip(local, 0, n_loc - 1)
  out = []
  for a in arrays:
    keep = inside.reshape((-1,) + (1,) * (a.ndim - 1))
    out.append(_psum(jnp.where(keep, a[safe], jnp.zeros((), a.dtype)), axes))
  return out


def _gumbel_top(key, scores, taken, gidx, c, noise, axes):
  """Global top-c of scores (+ Gumbel noise) over untaken rows → [c] global indices.

  Noise of row k is drawn from fold_in(key, k) with the global k, so it does not depend
  on how rows are sharded. Rows already taken are −inf.
  """
  v = scores
  if noise:
    v = v + jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(gidx)
  v = jnp.where(taken, -jnp.inf, v)
  vals, pos = lax.top_k(v, min(c, v.shape[0]))
  vals, ids = _all_gather(vals, axes), _all_gather(gidx[pos], axes)
  _, best = lax.top_k(vals, c)
  return ids[best]


def _n_tiles(n_loc, cols, block_bytes):
  """Fewest equal row tiles of n_loc rows whose [rows, cols] float32 block fits block_bytes."""
  rows_max = max(1, block_bytes // (4 * cols))
  return next(s for s in range(-(-n_loc // rows_max), n_loc + 1) if n_loc % s == 0)


def _map_row_tiles(fn, rows, n_tiles):
  """fn(*tiles) on n_tiles equal tiles of the leading axis of the arrays `rows`, one tile
  at a time (lax.map, so one tile's blocks are alive); fn returns a pytree of [tile]
  arrays, joined back to [n_loc]. Rows are independent, so the result is the untiled one."""
  if n_tiles == 1:
    return fn(*rows)
  out = lax.map(lambda t: fn(*t), [a.reshape(n_tiles, -1, *a.shape[1:]) for a in rows])
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)


def _sigmoid_chunk_update(models, chunk, n_tiles):
  """[n_loc] Σ_{j∈chunk} (L_kj + L_jk) for every local row k ∉ chunk.

  models: [(w, x [n_loc, d], y [n_loc, d], t, b)]; chunk: [(xc [c, d], yc [c, d])].
  Memory O(n_loc / n_tiles × c). For k ∉ S every pair (k, j∈chunk) is a negative, so the
  blocks are built with offsets that never meet (row_offset 0, col_offset n_loc); rows of
  the chunk itself get wrong values but are masked as selected.
  """
  n_loc = models[0][1].shape[0]

  def tile(*xy):
    total = 0.0
    for (w, _, _, t, b), (xc, yc), x, y in zip(models, chunk, xy[0::2], xy[1::2]):
      l_kj = losses.sigmoid_pair_losses(x, yc, t, b, row_offset=0, col_offset=n_loc)
      # ℓ(j, k) has logit t · x_j·y_k + b: the same block with the towers' roles swapped.
      l_jk = losses.sigmoid_pair_losses(y, xc, t, b, row_offset=0, col_offset=n_loc)
      total = total + w * (jnp.sum(l_kj, axis=1) + jnp.sum(l_jk, axis=1))
    return total

  return _map_row_tiles(tile, [a for _, x, y, _, _ in models for a in (x, y)], n_tiles)


def _softmax_full_lse(x, y, t, c, axes, n_shards, block_bytes):
  """Row and column log-sum-exp of t·X Yᵀ over the whole super-batch, [n_loc] each.

  Column blocks are gathered from every shard a slice at a time (slices of ≤ c/shards
  rows each) and met by row tiles, so memory stays O(block_bytes).
  """
  n_loc = x.shape[0]
  target = max(1, c // n_shards)
  steps = next(s for s in range(-(-n_loc // target), n_loc + 1) if n_loc % s == 0)
  blk = n_loc // steps
  n_tiles = _n_tiles(n_loc, blk * n_shards, block_bytes)

  def body(s, carry):
    xb = _all_gather(lax.dynamic_slice_in_dim(x, s * blk, blk), axes)
    yb = _all_gather(lax.dynamic_slice_in_dim(y, s * blk, blk), axes)

    def tile(x, y, row, col):
      row = jnp.logaddexp(row, jax.nn.logsumexp(losses.softmax_logits(x, yb, t), axis=1))
      col = jnp.logaddexp(col, jax.nn.logsumexp(losses.softmax_logits(y, xb, t), axis=1))
      return row, col

    return _map_row_tiles(tile, [x, y, *carry], n_tiles)

  init = (jnp.full((n_loc,), -jnp.inf, jnp.float32),) * 2
  return lax.fori_loop(0, steps, body, init)


def _diag_scores_shard(models, loss, c, axes, n_shards, block_bytes):
  """[n_loc] s(k | ∅): L_kk (sigmoid) or the per-example CLIP loss in the super-batch."""
  total = 0.0
  for w, x, y, t, b in models:
    if loss == "sigmoid":
      per = _diag_sigmoid_losses(Embeddings(x, y, t, b))
    else:
      zkk = t * jnp.sum(x * y, axis=1)
      row, col = _softmax_full_lse(x, y, t, c, axes, n_shards, block_bytes)
      per = 0.5 * ((row - zkk) + (col - zkk))
    total = total + w * per
  return total.astype(jnp.float32)


# ---------------------------------------------------------------------------
# The selection loop, on one shard of rows.

def _select_shard(key, models, *, num_select, n_chunks, loss, noise, axes, n_shards,
                  block_bytes):
  """Chunked joint selection on this shard's rows.

  models: [(w, x, y, t, b)] with x, y: [n_loc, d] this shard's rows.
  Returns (idx [num_select] int32 global indices, replicated;
           scores [n_chunks, n_loc]: s(k | S) before each chunk's draw, −inf if k ∈ S).
  """
  n_loc = models[0][1].shape[0]
  c = num_select // n_chunks
  lo = (lax.axis_index(axes) * n_loc) if axes else 0
  gidx = (lo + jnp.arange(n_loc)).astype(jnp.int32)

  def mark(taken, chosen):
    local = chosen - lo
    local = jnp.where((local >= 0) & (local < n_loc), local, n_loc)
    return taken.at[local].set(True, mode="drop")

  s0 = _diag_scores_shard(models, loss, c, axes, n_shards, block_bytes)
  taken = jnp.zeros((n_loc,), bool)
  chosen = _gumbel_top(jax.random.fold_in(key, 0), s0, taken, gidx, c, noise, axes)
  idx = jnp.full((num_select,), -1, jnp.int32)
  idx = lax.dynamic_update_slice(idx, chosen.astype(jnp.int32), (0,))
  history = jnp.full((n_chunks, n_loc), -jnp.inf, jnp.float32).at[0].set(s0)
  taken = mark(taken, chosen)
  if n_chunks == 1:
    return idx, history

  n_tiles = _n_tiles(n_loc, c, block_bytes)
  # Softmax state per model: running lse over S of image k (A) and text k (B), and the
  # replicated embeddings of S (the change to S's members needs all of them).
  soft0 = tuple(
      (jnp.full((n_loc,), -jnp.inf, jnp.float32), jnp.full((n_loc,), -jnp.inf, jnp.float32),
       jnp.zeros((num_select, x.shape[1]), x.dtype), jnp.zeros((num_select, y.shape[1]), y.dtype))
      for _, x, y, _, _ in models) if loss == "softmax" else ()

  def body(r, carry):
    running, taken, idx, history, soft = carry
    prev = lax.dynamic_slice_in_dim(idx, (r - 1) * c, c)
    flat = _take_rows([a for _, x, y, _, _ in models for a in (x, y)], prev, lo, n_loc, axes)
    chunk = list(zip(flat[0::2], flat[1::2]))
    if loss == "sigmoid":
      running = running + _sigmoid_chunk_update(models, chunk, n_tiles)
      scores = running
    else:
      scores, soft = _softmax_conditional(models, chunk, soft, idx, r, c, lo, n_loc, axes,
                                          n_tiles)
    history = history.at[r].set(jnp.where(taken, -jnp.inf, scores))
    chosen = _gumbel_top(jax.random.fold_in(key, r), scores, taken, gidx, c, noise, axes)
    idx = lax.dynamic_update_slice(idx, chosen.astype(jnp.int32), (r * c,))
    return running, mark(taken, chosen), idx, history, soft

  carry = (s0, taken, idx, history, soft0)
  _, _, idx, history, _ = lax.fori_loop(1, n_chunks, body, carry)
  return idx, history


def _softmax_conditional(models, chunk, soft, idx, r, c, lo, n_loc, axes, n_tiles):
  """Softmax s(k | S) for the local rows once chunk r−1 has joined S (see joint_select).

  Returns ([n_loc] scores, updated softmax state).
  """
  total = 0.0
  new_soft = []
  for (w, x, y, t, _), (xc, yc), (a_run, b_run, xs, ys) in zip(models, chunk, soft):
    # Running lse over S: image k vs S's texts (A), text k vs S's images (B).
    def lse_tile(x, y, a, b, t=t, xc=xc, yc=yc):
      return (jnp.logaddexp(a, jax.nn.logsumexp(losses.softmax_logits(x, yc, t), axis=1)),
              jnp.logaddexp(b, jax.nn.logsumexp(losses.softmax_logits(y, xc, t), axis=1)))

    a_run, b_run = _map_row_tiles(lse_tile, [x, y, a_run, b_run], n_tiles)
    xs = lax.dynamic_update_slice(xs, xc, ((r - 1) * c, 0))
    ys = lax.dynamic_update_slice(ys, yc, ((r - 1) * c, 0))
    # A_i, B_i of the members i ∈ S, from the shards that own them (−1 slots → 0, unused).
    a_s, b_s = _take_rows([a_run, b_run], idx, lo, n_loc, axes)

    # Loss of k itself in the batch S ∪ {k}.
    zkk = t * jnp.sum(x * y, axis=1)
    own = 0.5 * ((jnp.logaddexp(a_run, zkk) - zkk) + (jnp.logaddexp(b_run, zkk) - zkk))

    # Change k causes to each member i ∈ S: ½[softplus(z_ik − A_i) + softplus(z_ki − B_i)],
    # summed over S one chunk at a time, per row tile (memory O(n_loc / n_tiles × c)).
    def change_tile(x, y, t=t, xs=xs, ys=ys, a_s=a_s, b_s=b_s):
      def member_change(q, acc):
        xq = lax.dynamic_slice_in_dim(xs, q * c, c)
        yq = lax.dynamic_slice_in_dim(ys, q * c, c)
        aq = lax.dynamic_slice_in_dim(a_s, q * c, c)
        bq = lax.dynamic_slice_in_dim(b_s, q * c, c)
        z_ik = losses.softmax_logits(y, xq, t)  # [rows, c]: image i ∈ S vs text k
        z_ki = losses.softmax_logits(x, yq, t)  # image k vs text i ∈ S
        return acc + 0.5 * jnp.sum(jax.nn.softplus(z_ik - aq[None]) +
                                   jax.nn.softplus(z_ki - bq[None]), axis=1)
      return lax.fori_loop(0, r, member_change, jnp.zeros((x.shape[0],), jnp.float32))

    change = _map_row_tiles(change_tile, [x, y], n_tiles)
    total = total + w * (own + change)
    new_soft.append((a_run, b_run, xs, ys))
  return total.astype(jnp.float32), tuple(new_soft)


def _run(key, learner, reference, *, num_select, n_chunks, score, loss, noise, mesh,
         data_axes, block_bytes=BLOCK_BYTES):
  """Validate, then run `_select_shard` plainly or in a shard_map over the data axes."""
  _check_loss(loss)
  weighted = _weighted_models(learner, reference, score)
  n = weighted[0][1].image.shape[0]
  num_select, n_chunks = _check_counts(n, num_select, n_chunks)
  axes, n_shards = _row_axes(mesh, data_axes, n)
  weights = [w for w, _ in weighted]
  arrays = [(m.image, m.text, jnp.asarray(m.temperature, jnp.float32),
             jnp.asarray(m.bias, jnp.float32)) for _, m in weighted]

  def shard_fn(key, arrays):
    models = [(w,) + tuple(a) for w, a in zip(weights, arrays)]
    return _select_shard(key, models, num_select=num_select, n_chunks=n_chunks, loss=loss,
                         noise=noise, axes=axes, n_shards=n_shards,
                         block_bytes=block_bytes)

  if mesh is None:
    return shard_fn(key, arrays)
  rows = P(axes)
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    # Explicit meshes carry shardings in the types: shard_map wants them to match.
    put = lambda a, spec: jax.reshard(a, NamedSharding(mesh, spec))
    arrays = [(put(x, rows), put(y, rows), put(t, P()), put(b, P())) for x, y, t, b in arrays]
    key = put(key, P())
  fn = shard_map(shard_fn, mesh=mesh,
                 in_specs=(P(), [(rows, rows, P(), P())] * len(arrays)),
                 # idx is equal on every shard by construction (all-gathered then top-c).
                 out_specs=(P(), P(None, axes)), check_vma=False)
  return fn(key, arrays)


# ---------------------------------------------------------------------------
# Public API.

def joint_select(key, learner, reference, *, num_select, n_chunks=16, score="learnability",
                 loss="sigmoid", mesh=None, data_axes=("data", "fsdp"),
                 return_scores=False, block_bytes=BLOCK_BYTES):
  """JEST joint selection of `num_select` distinct examples from a super-batch of N.

  Args:
    key: PRNG key. Chunk r, row k uses fold_in(fold_in(key, r), k).
    learner, reference: `Embeddings` of the super-batch ([N, d] each); either may be None
      when `score` does not use it ("easy_reference" / "hard_learner").
    num_select: B, static; must be divisible by n_chunks (chunk size c = B / n_chunks).
    n_chunks: number of sequential chunks (paper: 16); 1 = independent Gumbel sampling.
    score: "learnability" | "hard_learner" | "easy_reference".
    loss: "sigmoid" (the paper's main path) | "softmax" (CLIP variant, below).
    mesh: a jax Mesh; when given, rows are split over its `data_axes` (those it has)
      inside a shard_map, so pass embeddings sharded (or shardable) by rows.
      The result does not depend on the mesh.
    return_scores: also return the conditional scores (for tests / debugging).
    block_bytes: static per-device budget for one [rows, c] float32 block: the score
      updates run over row tiles that fit it (same results; smaller = less memory, more
      loop steps).
  Returns:
    int32 [num_select] distinct indices in [0, N), chunk by chunk, each chunk by
    decreasing perturbed score; with return_scores, also float32 [n_chunks, N]: s(k | S)
    before chunk r's draw, −inf for k already in S.

  Sigmoid: s(k | S) = L_kk + Σ_{j∈S}(L_kj + L_jk), a running sum updated per chunk.
  Cost O(N·B·d / devices), memory O(N/devices) plus one [rows, c] block (block_bytes).

  Softmax (CLIP, loss="softmax"): the loss of a batch does not decompose into pairs.
  With z_ij = t·x_i·y_j and, for a set S, A_i(S) = lse_{j∈S} z_ij, B_i(S) = lse_{j∈S} z_ji,
  the per-example loss of i in S is ℓ_i(S) = ½[(A_i(S) − z_ii) + (B_i(S) − z_ii)] and the
  batch score s(S) = Σ_m w_m Σ_{i∈S} ℓ^m_i(S) (w = +1 learner, −1 reference for
  learnability; a sum like the sigmoid's Σ_ij). The conditional score is the exact marginal
  gain, as it is for the sigmoid:
    s(k | S) = s(S ∪ {k}) − s(S) = Σ_m w_m [ ℓ^m_k(S ∪ {k})
               + Σ_{i∈S} ½(softplus(z^m_ik − A^m_i(S)) + softplus(z^m_ki − B^m_i(S))) ]
  where ℓ_k(S ∪ {k}) = ½[(logaddexp(A_k(S), z_kk) − z_kk) + (logaddexp(B_k(S), z_kk) − z_kk)]
  and the softplus terms are how much k's presence raises each member's lse. A_k, B_k
  are running lse's per row (updated per chunk); A_i, B_i of the members are gathered from
  their shards, and the members' term is recomputed over S every chunk, one chunk of S at a
  time: memory O(N/devices) plus one [rows, c] block and S's embeddings (B × d) replicated, cost
  O(n_chunks · N · B · d / devices). For S = ∅ the marginal gain is 0 for every k (one
  example alone has zero CLIP loss), so the first chunk instead uses the per-example CLIP
  loss within the whole super-batch, the same score as `independent_select(loss="softmax")`.
  """
  idx, history = _run(key, learner, reference, num_select=num_select, n_chunks=n_chunks,
                      score=score, loss=loss, noise=True, mesh=mesh, data_axes=data_axes,
                      block_bytes=block_bytes)
  return (idx, history) if return_scores else idx


def independent_select(key, learner, reference, *, num_select, score="learnability",
                       method="topk", loss="sigmoid", mesh=None, data_axes=("data", "fsdp")):
  """Independent selection: B examples by their own score s(k | ∅) alone.

  s(k | ∅) is L_kk (sigmoid) or the per-example CLIP loss within the super-batch (softmax),
  combined over the models by `score`. method "topk" takes the B best; "sample" draws B
  without replacement with p ∝ exp(s) (Gumbel-top-k; the same noise as the first chunk of
  `joint_select`, so it equals joint_select(..., n_chunks=1) for the same key).
  Returns int32 [num_select] distinct indices, by decreasing (perturbed) score.
  """
  if method not in INDEPENDENT_METHODS:
    raise ValueError(f"method={method!r}: choose one of {', '.join(INDEPENDENT_METHODS)}")
  idx, _ = _run(key, learner, reference, num_select=num_select, n_chunks=1, score=score,
                loss=loss, noise=method == "sample", mesh=mesh, data_axes=data_axes)
  return idx

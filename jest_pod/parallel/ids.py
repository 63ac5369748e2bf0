"""Example ids (`batch["index"]`, int64) across the host → device boundary.

JAX runs without x64, so an int64 array put on the devices becomes int32: ids past 2^31
would be cut (and `selected_ids.jsonl` wrong). Ids travel instead as int32 [..., 2]
words (high, low), gathered with the other rows of the super-batch by JEST's selection
(the indices are global, so each row's words move with it on any host count), and are
joined back to int64 on the host. Exact for every int64, negatives (-1 padding) included.
"""

from __future__ import annotations

import numpy as np

from jest_pod.parallel import distributed


def split(ids) -> np.ndarray:
  """int64 [...] → int32 [..., 2]: (id >> 32, the low 32 bits as an int32 bit pattern)."""
  ids = np.asarray(ids, np.int64)
  hi = (ids >> 32).astype(np.int32)  # arithmetic shift: in int32 range for any int64
  lo = (ids & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
  return np.stack([hi, lo], axis=-1)


def join(words) -> np.ndarray:
  """int32 [..., 2] from `split` → int64 [...]."""
  words = np.asarray(words)
  hi = words[..., 0].astype(np.int64)
  lo = words[..., 1].astype(np.int64) & 0xFFFFFFFF  # undo the int32 bit pattern's sign
  return (hi << 32) | lo


def host_ids(device_words) -> np.ndarray:
  """The global int64 ids of a device batch's `index` (a collective when the array spans
  processes: every process must call it at the same point)."""
  return join(distributed.host_array(device_words))

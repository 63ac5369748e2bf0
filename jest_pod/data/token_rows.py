"""Token rows: every record's caption as token ids, with its label and source id, for
one tokenizer and caption length, beside the data set.

Phase 1 of two-phase input (data/two_phase.py) reads these and the score images instead
of the records: reading, parsing and tokenising a record costs the host ~100 µs, as much
as decoding a small image, and JEST scores 1/(1 − f) records per trained one.

  DATA/token_rows/<tokenizer sha256[:16]>_L<length>/   rows int32 [rows, L + 2]: the
      caption's L token ids, the label (-1: none), the source (the index of the record's
      source in the data set's manifest, as the pipeline numbers it) — one array, so a
      look-up is one read; meta.json: the data set's fingerprint, the tokenizer's sha256
      (its model bytes and text style), `bad` (records that could not be read)

The same row store as the reference cache (data/reference_cache.py: a crc32 per row).
`jest-pod data tokenizer` writes the rows of the tokenizer it trains at the shipped
configs' caption length; `jest-pod data score-images --max-text-len L` any other.
"""

from __future__ import annotations

import contextlib

import numpy as np

from jest_pod.data import records, sources
from jest_pod.data import reference_cache as store_lib

DIR = "token_rows"
FORMAT = "jest_pod token rows v1 (zarr3 rows + crc32 per row)"
NAMES = ("rows",)
SHIPPED_TEXT_LEN = 16  # configs/siglip.py's input.max_text_len (tests/test_two_phase.py)


class TokenRowsError(store_lib.ReferenceCacheError):
  """Token rows that are missing, incomplete, damaged or for other data or another
  tokenizer; the message names the command that builds them."""


def name(tokenizer, text_len: int) -> str:
  return f"{tokenizer.sha256[:16]}_L{int(text_len)}"


def path_for(data_dir: str, tokenizer, text_len: int) -> str:
  return store_lib.join(store_lib.join(data_dir, DIR), name(tokenizer, text_len))


def build(data_dir: str, tokenizer, text_len: int, *, output: str | None = None,
          batch_size: int = 1024, lock=None) -> str:
  """Tokenises every record's caption of `data_dir` once (every process its share p::P);
  returns the folder (default DATA/token_rows/<name>). `lock`: a context manager held
  while writing (the caller's builder lock)."""
  output = output or path_for(data_dir, tokenizer, text_len)
  _, names = sources.open_source(data_dir)
  ids = {n: i for i, n in enumerate(names)}

  def row(raw):
    rec = records.decode(raw)
    label = -1 if rec.label is None else rec.label
    return (np.concatenate([tokenizer.encode(rec.text, text_len),
                            np.array([label, ids.get(rec.source, -1)], np.int32)]),)

  arrays = {"rows": ((int(text_len) + 2,), "int32")}
  meta = {"tokenizer_sha256": tokenizer.sha256, "text_len": int(text_len),
          "fingerprint": sources.fingerprint(data_dir)}
  with lock or contextlib.nullcontext():
    store_lib.build_rows(data_dir, output, arrays, row, fmt=FORMAT, what="token rows",
                         meta=meta, batch_size=batch_size)
  return output


class TokenRows:
  """An open, verified store: `host_inputs(host_batch)` → text, label and source of the
  batch's records; `bad` the records that could not be read when it was built."""

  def __init__(self, store: store_lib.Store):
    self.store, self.path = store, store.path
    self.bad = frozenset(int(i) for i in store.meta.get("bad", ()))

  def host_inputs(self, host_batch) -> dict[str, np.ndarray]:
    (rows,) = self.store.read(host_batch["index"])
    return {"text": rows[:, :-2], "label": rows[:, -2], "source": rows[:, -1]}


def open_store(path: str, *, data_dir: str, tokenizer, text_len: int,
               rebuild: str) -> TokenRows:
  """The token rows at `path`; TokenRowsError naming `rebuild` (the command that builds
  them) unless complete and built from the same records with the same tokenizer and
  caption length."""
  meta = store_lib.complete_meta(path, what="token rows", rebuild=rebuild,
                                 error=TokenRowsError)
  diffs = []
  if meta.get("tokenizer_sha256") != tokenizer.sha256 or meta.get("text_len") != text_len:
    diffs.append(f"built with tokenizer {str(meta.get('tokenizer_sha256'))[:16]}… and length "
                 f"{meta.get('text_len')}, this run uses {tokenizer.sha256[:16]}… and "
                 f"{text_len}")
  if meta.get("fingerprint") != sources.fingerprint(data_dir):
    diffs.append(f"built from other records than {data_dir} (the data set was rebuilt: "
                 "its shard checksums differ)")
  if diffs:
    raise TokenRowsError(f"token rows {path} do not match this run: {'; '.join(diffs)}. "
                         f"Rebuild them with `{rebuild}`")
  return TokenRows(store_lib.Store(path, meta, rebuild, names=NAMES, fmt=FORMAT,
                                   what="token rows", error=TokenRowsError))


def find(data_dir: str, tokenizer, text_len: int) -> str | None:
  """DATA/token_rows/<name> when it holds a store (complete or torn: open_store judges)."""
  if not sources.is_folder(data_dir):
    return None
  path = path_for(data_dir, tokenizer, text_len)
  try:
    return path if store_lib.read_meta(path) is not None else None
  except store_lib.ReferenceCacheError:  # a torn meta.json: open_store names it
    return path

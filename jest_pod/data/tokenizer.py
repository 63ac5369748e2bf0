"""The text tokenizer: a sentencepiece model and the rule that turns a caption into ids.

`jest-pod data tokenizer --data SPEC --vocab-size N [--output PATH]` trains on the
captions of any source kind (`sources.captions`) and writes PATH (default: the kind's own
tokenizer path, `DIR/tokenizer.model` for a folder) and the `tokenizer.json` beside it
({vocab_size, sha256, num_captions, ...}). Ids: 0 = pad (the
contract of the host batch), 1 = unk, 2 = bos, 3 = eos; text is lowercased by the
normaliser (`nmt_nfkc_cf`) so that "Dog" and "dog" share ids.

Text styles (`config.input.text_style`), the rule from caption to ids:
  plain         sentencepiece ids, truncated, padded with 0 (this project's FlexiViT family)
  siglip        SigLIP's: lower-case, strip ASCII punctuation, collapse whitespace, then
                "sticky" EOS: ids[:L-1] + [</s>], padded with </s> (big_vision's
                `eos="sticky"`, transformers' SiglipTokenizer with padding="max_length")
  siglip_cased  the same without lower-casing (a SiglipTokenizer with do_lower_case=False)
The style is part of `Tokenizer.sha256`, so a cache or a check keyed by it tells them apart.

A `Tokenizer` pickles as its serialized model (not its path): Grain worker processes
get a working copy without touching the file system.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import string
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from jest_pod.data import reference_cache as store_lib
from jest_pod.data import sources, token_rows
from jest_pod.data.input_config import cfg_get

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TEXT_STYLES = ("plain", "siglip", "siglip_cased")
EOS_PIECE = "</s>"  # SigLIP's EOS and pad piece (id 1 in c4_en, 3 in this project's models)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
INFO_NAME = "tokenizer.json"


class TokenizerError(RuntimeError):
  """A missing or unusable tokenizer; the message says what to run."""


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int) -> str:
  """Trains a unigram sentencepiece model on `texts`; returns the `.model` path.

  `vocab_size` is a maximum: a small corpus cannot support many pieces, so we let
  sentencepiece shrink it (`hard_vocab_limit=False`); read `Tokenizer.vocab_size`.
  Every character gets a piece when the vocabulary has room for them all (see
  `_character_coverage` for a corpus with more).
  """
  texts = [t.replace("\n", " ") for t in texts if t and t.strip()]
  if not texts:
    raise TokenizerError("train_tokenizer: no non-empty texts to train on")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  model = io.BytesIO()
  coverage = _character_coverage(texts, vocab_size)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding = lowercase
      hard_vocab_limit=False, character_coverage=coverage,
      num_threads=1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
      minloglevel=2)
  path = model_prefix + ".model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


def _character_coverage(texts: list[str], vocab_size: int) -> float:
  """1.0 when every distinct character fits in the vocabulary with room to spare; else
  the share of character occurrences covered by the vocab_size // 2 most frequent ones
  (a multilingual corpus: the rarest characters map to unk, and half the vocabulary is
  left for multi-character pieces). The icon pool: 1,174 characters for 1,024 pieces."""
  counts = collections.Counter("".join(texts).lower())
  if len(counts) + 4 < vocab_size:  # + pad, unk, bos, eos
    return 1.0
  top = sum(n for _, n in counts.most_common(vocab_size // 2))
  # Just under: the next character is left out; sentencepiece accepts ≥ 0.98.
  return max(0.98, top / sum(counts.values()) - 1e-9)


def canonicalize(text: str, lower: bool = True) -> str:
  """SigLIP's caption canonicalisation (big_vision prompt_engineering, transformers'
  SiglipTokenizer.canonicalize_text): lower-case, drop ASCII punctuation, one space."""
  if lower:
    text = text.lower()
  return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


class Tokenizer:
  """A sentencepiece model and a text style (module docstring):
  `encode(text, max_len) -> int32 [max_len]`, `encode_batch(texts, max_len) -> int32
  [b, max_len]`; `pad_id` is what fills a short caption."""

  def __init__(self, path: str | None = None, *, model_proto: bytes | None = None,
               text_style: str = "plain"):
    if text_style not in TEXT_STYLES:
      raise TokenizerError(f"text style {text_style!r} (config.input.text_style): choose one "
                           f"of {', '.join(TEXT_STYLES)}")
    if model_proto is None:
      if not path or not os.path.exists(path):
        raise TokenizerError(missing_message(path))
      with open(path, "rb") as f:
        model_proto = f.read()
    self.path = path
    self.text_style = text_style
    self._proto = model_proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # pylint: disable=broad-except  (sentencepiece raises bare errors)
      raise TokenizerError(f"{path or 'tokenizer'}: not a sentencepiece model ({e}); point "
                           "config.input.tokenizer (or --tokenizer) at a .model file") from e
    self.eos_id = EOS_ID
    self.pad_id = PAD_ID
    if text_style != "plain":
      self.eos_id = self.pad_id = int(self._sp.piece_to_id(EOS_PIECE))
      if self._sp.id_to_piece(self.eos_id) != EOS_PIECE:
        raise TokenizerError(f"{path or 'tokenizer'} has no {EOS_PIECE!r} piece, which text "
                             f"style {text_style!r} appends and pads with")

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def sha256(self) -> str:
    """Of the model bytes (plain), or of the bytes and the style: the tokenizer's identity."""
    h = hashlib.sha256(self._proto)
    if self.text_style != "plain":
      h.update(f"|text_style={self.text_style}".encode())
    return h.hexdigest()

  def _ids(self, text_ids: list[int], max_len: int, out: np.ndarray) -> None:
    if self.text_style == "plain":
      ids = text_ids[:max_len]
    else:  # sticky EOS: the last real position is always </s>, whatever the truncation
      ids = text_ids[:max_len - 1] + [self.eos_id]
    out[:len(ids)] = ids

  def _prepare(self, text: str) -> str:
    return text if self.text_style == "plain" else canonicalize(
        text, lower=self.text_style == "siglip")

  def encode(self, text: str, max_len: int) -> np.ndarray:
    """One text -> int32 ids [max_len]: equal to `encode_batch([text], max_len)[0]`, the
    pipeline's per-example path.

    sentencepiece's list encoder starts a thread pool per call, whose cost grows with the
    host's core count (69 µs vs 3.6 µs for one caption on a 2-core host; 3x slower on 16).
    """
    out = np.full((max_len,), self.pad_id, np.int32)
    self._ids(self._sp.encode(self._prepare(text)), max_len, out)
    return out

  def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """texts [b] -> int32 ids [b, max_len], truncated, padded with `pad_id`."""
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, ids in enumerate(self._sp.encode([self._prepare(t) for t in texts])):
      self._ids(ids, max_len, out[i])
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i not in (self.pad_id, PAD_ID)
                            and not (self.text_style != "plain" and i == self.eos_id)])

  @property
  def model_proto(self) -> bytes:
    """The serialized sentencepiece model (what an export writes as spiece.model)."""
    return self._proto

  # Pickle the model bytes so Grain workers need no file access.
  def __getstate__(self):
    return {"path": self.path, "proto": self._proto, "text_style": self.text_style}

  def __setstate__(self, state):
    self.__init__(state["path"], model_proto=state["proto"],
                  text_style=state["text_style"])


def resolve(input_config: Any = None, explicit: Any = None) -> Tokenizer:
  """The tokenizer a run's text tower was trained with: the one rule for training,
  evaluation and the reference cache.

  `explicit` (a path or Tokenizer), else `input_config.tokenizer`, else
  `<first data dir>/tokenizer.model` (a mixture's first component). An eval set's own
  tokenizer.model is not a fallback: another vocabulary would score garbage silently.
  `input_config`: a ConfigDict or dict (`{"data": DIR}` for a data set's own tokenizer);
  its `text_style` (default "plain") comes with the model.
  """
  spec = explicit or cfg_get(input_config, "tokenizer")
  if isinstance(spec, Tokenizer):
    return spec
  style = cfg_get(input_config, "text_style", "plain")
  if not spec:
    mixture = list(cfg_get(input_config, "mixture") or [])
    first_dir = str(mixture[0][0]) if mixture else cfg_get(input_config, "data")
    if not first_dir:
      raise TokenizerError("no tokenizer: config.input sets neither `tokenizer` nor a "
                           "`data`/`mixture` folder holding tokenizer.model")
    spec = sources.tokenizer_path(str(first_dir))
    if spec is None:
      raise TokenizerError(
          f"the {sources.scheme(str(first_dir))} source has no tokenizer.model: set "
          "config.input.tokenizer to a tokenizer path (for the virtual source any will do; "
          "see jest_pod/experiments/bench/data.py)")
  return Tokenizer(str(spec), text_style=style)


def missing_message(path: str | None) -> str:
  data_dir = os.path.dirname(path) if path else "DIR"
  return (f"tokenizer not found: {path!r}. Create it from the data set's captions with\n"
          f"  jest-pod data tokenizer --data {data_dir or '.'} --vocab-size 8000\n"
          f"or point config.input.tokenizer at an existing tokenizer.model.")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises if the model's text embedding cannot hold every id the tokenizer emits."""
  if model_vocab_size < tokenizer.vocab_size:
    raise TokenizerError(
        f"config's text vocab_size={model_vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size} ({tokenizer.path}): ids would index past the embedding. "
        f"Set config.model.text.vocab_size >= {tokenizer.vocab_size}.")


def main(argv: list[str]) -> int:
  """`jest-pod data tokenizer --data SPEC --vocab-size N [--output PATH]`."""
  p = argparse.ArgumentParser(prog="jest-pod data tokenizer",
                              description="train a tokenizer on a data set's captions")
  p.add_argument("--data", required=True,
                 help="data set: a folder (manifest.json + shards) or another source kind's "
                      "spec (jest_pod.data.sources.KINDS)")
  p.add_argument("--vocab-size", type=int, default=8000,
                 help="maximum vocabulary size (smaller corpora get fewer pieces)")
  p.add_argument("--output", default=None,
                 help="the .model to write (default: the data set's own, DIR/tokenizer.model)")
  args = p.parse_args(argv)
  if not sources.exists(args.data):
    print(f"jest-pod data tokenizer: {args.data!r} has no manifest.json; "
          f"build or ingest a data set there first", file=sys.stderr)
    return 2
  output = args.output or sources.tokenizer_path(args.data)
  if not output:
    print(f"jest-pod data tokenizer: the {sources.scheme(args.data)} source has no place "
          "for a tokenizer of its own: pass --output PATH.model", file=sys.stderr)
    return 2
  prefix = output[:-len(".model")] if output.endswith(".model") else output
  captions = list(sources.captions(args.data))
  path = train_tokenizer(captions, prefix, args.vocab_size)
  tok = Tokenizer(path)
  info = {"vocab_size": tok.vocab_size, "requested_vocab_size": args.vocab_size,
          "sha256": tok.sha256, "num_captions": len(captions),
          "model": os.path.basename(path), "data": args.data,
          "pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
          "normalization": "nmt_nfkc_cf"}
  with open(os.path.join(os.path.dirname(os.path.abspath(path)), INFO_NAME), "w") as f:
    json.dump(info, f, indent=2)
  print(f"wrote {path}: vocab_size={tok.vocab_size} from {len(captions)} captions, "
        f"sha256={tok.sha256[:16]}…")
  if sources.is_folder(args.data):  # phase 1 of two-phase input reads these (JEST runs)
    rows = token_rows.build(args.data, tok, token_rows.SHIPPED_TEXT_LEN,
                            lock=store_lib.builder_lock(args.data))
    print(f"wrote {rows}: the captions as {token_rows.SHIPPED_TEXT_LEN} tokens each")
  return 0

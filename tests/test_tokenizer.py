"""The sentencepiece tokenizer: ids, padding, lowercasing, pickling, CLI, errors."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from jest_pod.data import sources, tokenizer
from tests import helpers_data

TEXTS = [f"a {c} {s} number {i}" for i in range(50) for c in ("red", "blue", "green")
         for s in ("dog", "cat")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tokenizer.train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("t") / "tok"), 100)
  return tokenizer.Tokenizer(path)


def test_special_ids_and_vocab(tok):
  sp = tok._sp
  assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert tokenizer.PAD_ID == 0 and 4 < tok.vocab_size <= 100


def test_encode_batch_pads_truncates_lowercases(tok):
  ids = tok.encode_batch(["A RED Dog", "a red dog", "a red dog number 12 " * 5, ""], 12)
  assert ids.shape == (4, 12) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0], ids[1])  # normaliser lowercases
  assert (ids[0] > 0).sum() < 12 and ids[0, -1] == 0  # padded with 0
  assert (ids[2] > 0).all()  # truncated to max_len
  assert (ids[3] == 0).all()
  assert tok.decode(ids[1]) == "a red dog"


def test_single_string_encode_equals_encode_batch(tok):
  texts = ["A RED Dog", "a red dog number 12 " * 5, "", "  unseen wörds ✓ ", TEXTS[7]]
  for max_len in (1, 5, 12):
    batch = tok.encode_batch(texts, max_len)
    for text, want in zip(texts, batch):
      got = tok.encode(text, max_len)
      assert got.dtype == np.int32 and got.shape == (max_len,)
      np.testing.assert_array_equal(got, want)


def test_pickles_without_the_file(tok, tmp_path):
  other = tokenizer.Tokenizer(model_proto=tok._proto)
  clone = pickle.loads(pickle.dumps(other))
  np.testing.assert_array_equal(clone.encode_batch(["blue cat"], 4),
                                tok.encode_batch(["blue cat"], 4))


def test_missing_tokenizer_says_what_to_run(tmp_path):
  path = str(tmp_path / "tokenizer.model")
  with pytest.raises(tokenizer.TokenizerError) as e:
    tokenizer.Tokenizer(path)
  assert path in str(e.value)
  assert f"jest-pod data tokenizer --data {tmp_path}" in str(e.value)


def test_check_vocab(tok):
  tokenizer.check_vocab(tok, tok.vocab_size)
  tokenizer.check_vocab(tok, tok.vocab_size + 10)
  with pytest.raises(tokenizer.TokenizerError, match="vocab_size"):
    tokenizer.check_vocab(tok, tok.vocab_size - 1)


def test_cli_trains_on_a_data_set_folder(tmp_path):
  d = helpers_data.write_dataset(str(tmp_path / "d"), 12, bad_proto={2})
  os.remove(os.path.join(d, "tokenizer.model"))
  assert tokenizer.main(["--data", d, "--vocab-size", "60"]) == 0
  with open(os.path.join(d, "tokenizer.json")) as f:
    info = json.load(f)
  with open(os.path.join(d, "tokenizer.model"), "rb") as f:
    assert info["sha256"] == hashlib.sha256(f.read()).hexdigest()
  tok = tokenizer.Tokenizer(os.path.join(d, "tokenizer.model"))
  assert info["vocab_size"] == tok.vocab_size <= 60
  assert info["num_captions"] == 11  # the bad record is skipped


def test_cli_without_manifest_fails_clearly(tmp_path, capsys):
  assert tokenizer.main(["--data", str(tmp_path)]) == 2
  assert "manifest.json" in capsys.readouterr().err


def test_more_distinct_characters_than_pieces_still_trains(tmp_path):
  # A multilingual pool (the icon pool's labels) has more characters than a small
  # vocabulary: the rarest map to unk instead of failing the training.
  rare = [chr(0x4E00 + i) for i in range(120)]  # 120 CJK characters, each seen once
  texts = ["a red apple", "a green leaf", "the blue sky"] * 400 + rare
  path = tokenizer.train_tokenizer(texts, str(tmp_path / "t"), vocab_size=64)
  tok = tokenizer.Tokenizer(path)
  assert tok.vocab_size <= 64
  assert tok.encode_batch(["apple"], 8)[0][0] != tokenizer.UNK_ID
  unknown = sum(tokenizer.UNK_ID in tok.encode_batch([r], 8)[0] for r in rare)
  assert 0 < unknown < len(rare)  # the rarest are unk; what fits keeps its own piece


def test_cli_trains_on_any_source_kind(tmp_path, monkeypatch, capsys):
  # The trainer reads captions through the kind (`sources.captions`), not the folder.
  d = helpers_data.write_dataset(str(tmp_path / "d"), 12)
  monkeypatch.setitem(sources.KINDS, "mem", helpers_data.mem_kind(d))
  out = str(tmp_path / "mem" / "tok.model")
  assert tokenizer.main(["--data", "mem:7", "--vocab-size", "40", "--output", out]) == 0
  with open(tmp_path / "mem" / "tokenizer.json") as f:
    info = json.load(f)
  assert info["num_captions"] == 7 and info["data"] == "mem:7" and info["model"] == "tok.model"
  assert tokenizer.Tokenizer(out).vocab_size == info["vocab_size"] <= 40
  # A kind with no tokenizer of its own needs --output.
  assert tokenizer.main(["--data", "virtual:5"]) == 2
  assert "pass --output" in capsys.readouterr().err

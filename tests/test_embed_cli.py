"""`jest-pod embed` reads data as `train` does and writes nothing it should not (issue 32,
items 5 and 7), and `jest-pod data cache-reference` refuses NaN rows and says where it
wrote: on the tiny public SigLIP fixture (tests/fixtures/siglip_tiny) and a 32² toy set."""

import dataclasses
import errno
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jest_pod.data import sources
from jest_pod.data.toy import build_toy
from jest_pod.interop import embed_cli, formats
from jest_pod.jest import reference as reference_lib

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "siglip_tiny")
N = 48


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return build_toy(str(tmp_path_factory.mktemp("toy32")), N, noise=0.2, image_size=32)


def _copy(toy, tmp_path):
  out = str(tmp_path / "data")
  shutil.copytree(toy, out)
  return out


def _shard0(data):
  with open(os.path.join(data, "manifest.json")) as f:
    return os.path.join(data, json.load(f)["shards"][0]["file"])


def _flip_a_byte(data):
  path = _shard0(data)
  with open(path, "r+b") as f:
    f.seek(200)  # inside the first chunk's data: its hash no longer matches
    b = f.read(1)
    f.seek(200)
    f.write(bytes([b[0] ^ 0xFF]))


def _garbage(data):
  path = _shard0(data)
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))


def _count_one_too_high(data):
  path = os.path.join(data, "manifest.json")
  with open(path) as f:
    m = json.load(f)
  m["shards"][0]["num_records"] += 1
  m["num_examples"] += 1
  m["source_counts"][m["sources"][0]] += 1
  with open(path, "w") as f:
    json.dump(m, f)


@pytest.mark.parametrize("damage,left_out", [(_flip_a_byte, None), (_garbage, N // 2),
                                             (_count_one_too_high, 1)])
def test_embed_skips_and_counts_damaged_records_like_train(toy, tmp_path, capsys, caplog,
                                                           monkeypatch, damage, left_out):
  data, out = _copy(toy, tmp_path), str(tmp_path / "e.npz")
  damage(data)
  # The bad-record log is rate-limited per process: earlier tests' skips must not mute it.
  monkeypatch.setattr(sources.bad_record_log, "count", 0)
  assert embed_cli.main([HF, "--data", data, "--output", out, "--batch-size", "16"]) == 0
  said = capsys.readouterr()
  got = np.load(out)
  n = json.load(open(os.path.join(data, "manifest.json")))["num_examples"]
  skipped = n - len(got["index"])
  assert skipped >= 1 and (left_out is None or skipped == left_out), skipped
  assert f"{skipped} record(s) could not be read or decoded" in said.out
  assert np.isfinite(got["image"]).all() and len(got["id"]) == len(got["index"])
  # The damaged shard is named (the training source's log line).
  assert _shard0(data) in caplog.text and f"jest-pod data verify {data}" in caplog.text


def test_embed_batch_size_zero_is_one_line(toy, tmp_path, capsys):
  out = str(tmp_path / "e.npz")
  assert embed_cli.main([HF, "--data", toy, "--output", out, "--batch-size", "0"]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--batch-size=0" in err and ">= 1" in err
  assert not os.path.exists(out)


def _nan_load(monkeypatch):
  real = formats.load

  def load(*a, **kw):
    got = real(*a, **kw)
    return dataclasses.replace(got, params=jax.tree.map(lambda x: x * np.nan, got.params))
  monkeypatch.setattr(formats, "load", load)


def test_embed_refuses_nonfinite_embeddings_and_writes_nothing(toy, tmp_path, capsys,
                                                               monkeypatch):
  _nan_load(monkeypatch)
  out = str(tmp_path / "e.npz")
  assert embed_cli.main([HF, "--data", toy, "--output", out]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "non-finite embeddings" in err and HF in err, err
  assert "nothing was written" in err and os.listdir(tmp_path) == []


def test_embed_disk_full_names_the_output_and_leaves_no_partial_file(toy, tmp_path, capsys,
                                                                     monkeypatch):
  real = np.savez

  def full(file, **arrays):  # writes part of the archive, then the disk is full
    real(file, **arrays)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(np, "savez", full)
  out = str(tmp_path / "out" / "e.npz")
  assert embed_cli.main([HF, "--data", toy, "--output", out]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and out in err and "No space left on device" in err, err
  assert "the folder" not in err and os.listdir(tmp_path / "out") == []


def test_embed_writes_exactly_the_output_path(toy, tmp_path, capsys):
  out = str(tmp_path / "e")  # no .npz suffix: np.savez alone would write e.npz
  assert embed_cli.main([HF, "--data", toy, "--output", out]) == 0
  assert os.listdir(tmp_path) == ["e"] and len(np.load(out)["index"]) == N
  assert f"wrote {out}: {N} records" in capsys.readouterr().out


def test_cache_reference_refuses_nan_rows_and_writes_no_cache(toy, tmp_path, capsys,
                                                              monkeypatch):
  _nan_load(monkeypatch)
  out = str(tmp_path / "cache")
  assert reference_lib.main(["--data", toy, "--reference", HF, "--output", out]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "non-finite embeddings" in err and toy in err, err
  assert not os.path.exists(out)


def test_cache_reference_says_what_it_wrote_and_where(toy, tmp_path, capsys):
  out = str(tmp_path / "cache")
  assert reference_lib.main(["--data", toy, "--reference", HF, "--output", out]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith(f"wrote reference cache {out}:") and f"{N} examples" in last, last
  assert "config.selection.reference_cache" in last


def test_embed_of_a_set_with_no_readable_record_writes_nothing(toy, tmp_path, capsys):
  data, out = _copy(toy, tmp_path), str(tmp_path / "e.npz")
  for name in json.load(open(os.path.join(data, "manifest.json")))["shards"]:
    path = os.path.join(data, name["file"])
    with open(path, "wb") as f:
      f.write(np.random.default_rng(1).bytes(os.path.getsize(path)))
  assert embed_cli.main([HF, "--data", data, "--output", out]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"no record of {data} could be read" in err, err
  assert not os.path.exists(out)

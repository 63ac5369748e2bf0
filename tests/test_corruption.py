"""Damaged storage is a counted skip, never a crash; `jest-pod data verify` names the
damaged shards; an image with too many pixels is skipped before it is decoded."""

import io
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from jest_pod.data import cli as data_cli
from jest_pod.data import manifest as manifest_lib
from jest_pod.data import input_config, pipeline, records, sources
from tests import helpers_data

N = 40  # records, in 2 shards of 20


def _config(data, **kw):
  c = input_config.default_input_config()
  c.data, c.worker_count, c.image_size, c.max_text_len = data, 0, 8, 8
  for k, v in kw.items():
    c[k] = v
  return c


def _epoch(data_dir, batch=4, **kw):
  """One epoch of the training iterator -> (indices of the good records, records skipped).

  Each example's `skipped` counts the bad positions just before it, so walking the
  batches recovers which positions were good; stop at the end of the first epoch."""
  it = pipeline.make_train_iterator(_config(data_dir, **kw), global_batch_size=batch,
                                    seed=0, process_index=0, process_count=1)
  good, skipped, pos = [], 0, 0
  while pos < N:
    b = next(it)
    for index, s in zip(b["index"], b["skipped"]):
      skipped += min(int(s), max(N - pos, 0))  # skips of epoch 0 only
      pos += int(s)
      if pos < N:
        good.append(int(index))
      pos += 1
  return good, skipped


def _check_epoch(data_dir, bad: set, **kw):
  good, skipped = _epoch(data_dir, **kw)
  assert sorted(good) == sorted(set(range(N)) - bad)  # every intact record, once
  assert skipped == len(bad) and len(good) + skipped == N


def _shard(data_dir, k=0):
  return os.path.join(data_dir, manifest_lib.read(data_dir)["shards"][k]["file"])


def _flip(path, offset):
  data = bytearray(open(path, "rb").read())
  data[offset] ^= 0x01
  open(path, "wb").write(bytes(data))


@pytest.fixture
def data(tmp_path):
  return helpers_data.write_dataset(str(tmp_path / "d"), N)


def test_flipped_byte_is_a_counted_skip(data):
  path = _shard(data)
  offset = open(path, "rb").read().find(helpers_data.png(7))  # inside record 7's chunk
  assert offset > 0
  _flip(path, offset + 100)
  src, _ = sources.open_source(data)
  assert isinstance(src[7], sources.Unreadable) and isinstance(src[8], bytes)
  _check_epoch(data, {7})
  # Evaluation: the same record is masked out and counted, the rest are real.
  batches = list(pipeline.make_eval_iterator(data, batch_size=16, image_size=8,
                                             max_text_len=8, process_index=0,
                                             process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])[:N]
  assert mask[7] == 0 and mask.sum() == N - 1
  assert sum(int(b["skipped"].sum()) for b in batches) == 1


def test_random_bytes_shard_is_skipped_and_counted(data, caplog):
  path = _shard(data, 1)
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))
  _check_epoch(data, set(range(20, 40)))
  assert any("jest-pod data verify" in r.getMessage() and path in r.getMessage()
             for r in caplog.records)


def test_truncated_shard_warns_at_start_and_skips(data, caplog):
  m = manifest_lib.read(data)
  for s in m["shards"]:  # a manifest with sizes, as ingest writes it
    s["bytes"] = os.path.getsize(os.path.join(data, s["file"]))
  with open(os.path.join(data, "manifest.json"), "w") as f:
    json.dump(m, f)
  path = _shard(data, 0)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)
  _check_epoch(data, set(range(20)))
  assert any("damaged shard" in r.getMessage() and path in r.getMessage()
             for r in caplog.records)


def test_verify_reports_bad_shard(data, capsys):
  assert data_cli.main(["verify", data]) == 0
  assert "all 2 shards match" in capsys.readouterr().out
  path = _shard(data, 1)
  _flip(path, os.path.getsize(path) // 2)
  assert data_cli.main(["verify", data]) == 1
  out = capsys.readouterr()
  assert os.path.basename(path) in out.out and "sha256" in out.out
  assert _shard(data, 0) not in out.out and "re-ingest" in out.out
  assert "verify: 2/2 shards" in out.err


@pytest.mark.parametrize("delta", [100, -100])
def test_verify_reports_a_manifest_whose_record_count_is_off(data, capsys, delta):
  """Bytes intact, the manifest's count off by ±100 (totals kept consistent): training
  would read past the shard or never reach its end; verify must say so (issue 23)."""
  path = os.path.join(data, manifest_lib.MANIFEST)
  m = json.load(open(path))
  m["shards"][1]["num_records"] += delta
  m["num_examples"] += delta
  m["source_counts"][m["sources"][0]] += delta
  json.dump(m, open(path, "w"))
  assert data_cli.main(["verify", data]) == 1
  out = capsys.readouterr().out
  assert (f"the reader finds 20 records, the manifest says {20 + delta}" in out
          and "the manifest's count is wrong" in out), out
  assert m["shards"][1]["file"] in out and m["shards"][0]["file"] not in out


def _rename_shard(data, k, name):
  path = os.path.join(data, manifest_lib.MANIFEST)
  m = json.load(open(path))
  m["shards"][k]["file"] = name
  json.dump(m, open(path, "w"))


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_shard_paths_stay_inside_the_data_folder(data, tmp_path, capsys, escape):
  """issue 32: a manifest naming ../../../../etc/passwd (or a shard that is a symlink out)
  made verify and train open and hash that file; now the one manifest reader refuses it,
  in one line naming the manifest and the shard."""
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "secret").write_bytes(b"x" * 100)
  name = {"dotdot": "../../../../etc/passwd", "absolute": str(outside / "secret"),
          "symlink": "link.array_record", "symlinked_folder": "sub/secret"}[escape]
  if escape == "symlink":
    os.symlink(outside / "secret", os.path.join(data, name))
  if escape == "symlinked_folder":
    os.symlink(outside, os.path.join(data, "sub"))
  _rename_shard(data, 1, name)
  for check_files in (True, False):
    with pytest.raises(manifest_lib.ManifestError, match=r"manifest.json.*shard .* is outside "
                       r"the data folder .*rebuild the data set") as e:
      manifest_lib.read(data, check_files=check_files)
    assert name in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(manifest_lib.ManifestError, match="outside the data folder"):
    sources.open_source(data)
  assert data_cli.main(["verify", data]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "outside the data folder" in err and name in err, err
  # A symlink that stays inside the folder is fine.
  if escape == "symlink":
    os.remove(os.path.join(data, name))
    os.symlink(os.path.join(data, "toy-00000-of-00002.array_record"), os.path.join(data, name))
    manifest_lib.read(data, check_files=False)


def test_verify_footer_says_training_refuses_a_missing_shard(data, capsys):
  """issue 32: verify's footer said training skips a missing shard; training refuses it."""
  first = _shard(data, 0)
  os.remove(_shard(data, 1))
  assert data_cli.main(["verify", data]) == 1
  out = capsys.readouterr().out
  assert "file is missing" in out and "refuses to start while a shard is missing" in out, out
  assert "skips" not in out
  with pytest.raises(manifest_lib.ManifestError, match="missing"):  # what training does
    sources.open_source(data)
  _flip(first, os.path.getsize(first) // 2)  # one missing, one damaged
  assert data_cli.main(["verify", data]) == 1
  out = capsys.readouterr().out
  assert "refuses to start" in out and "skips (and counts) the records it cannot read from " \
      "the damaged shards" in out, out


@pytest.mark.parametrize("torn", ['{"format": "jest_pod ref', "", "[1, 2]", "\xff\xfe"])
def test_a_torn_reference_cache_meta_is_one_line_not_silence(data, caplog, torn):
  """issue 32: a torn DATA/reference_cache/meta.json was ignored without a word (the run
  silently ran the reference instead); now it is a warning, and an error where it is read."""
  import logging
  from jest_pod.data import reference_cache
  cache = os.path.join(data, reference_cache.CACHE_DIR)
  os.makedirs(cache)
  with open(os.path.join(cache, reference_cache.META), "w", encoding="latin-1") as f:
    f.write(torn)
  with caplog.at_level(logging.WARNING, logger="jest_pod"):
    assert reference_cache.default_path(data) is None
  warned = [r.getMessage() for r in caplog.records if "meta.json is damaged" in r.getMessage()]
  assert len(warned) == 1 and cache in warned[0] and "cache-reference" in warned[0], caplog.text
  assert "\n" not in warned[0]
  with pytest.raises(reference_cache.ReferenceCacheError, match=r"meta.json is damaged .*not "
                     r"used; delete .*cache-reference"):
    reference_cache.read_meta(cache)


def _bomb_png(side: int) -> bytes:
  buf = io.BytesIO()
  Image.new("L", (side, side)).save(buf, "PNG")  # uniform: a few KB for 64 Mpx
  return buf.getvalue()


def test_pixel_bomb_is_skipped_before_decoding(tmp_path):
  d = helpers_data.write_dataset(str(tmp_path / "d"), 4, num_shards=1)
  bomb = records.encode(records.Record(image=_bomb_png(8000), text="big", id="b",
                                       source="toy"))
  assert len(bomb) < 100_000
  w = array_record_module.ArrayRecordWriter(_shard(d), "group_size:1")  # record 0: bomb
  for blob in [bomb] + [records.encode(helpers_data.toy_record(i)) for i in (1, 2, 3)]:
    w.write(blob)
  w.close()
  batch = next(iter(pipeline.make_eval_iterator(d, batch_size=4, image_size=8,
                                                max_text_len=8, process_index=0,
                                                process_count=1, max_pixels=1_000_000)))
  np.testing.assert_array_equal(batch["mask"], [0, 1, 1, 1])
  assert batch["skipped"].sum() == 1
  b = next(pipeline.make_train_iterator(_config(d, max_pixels=1_000_000),
                                        global_batch_size=3, seed=0, process_index=0,
                                        process_count=1))
  assert sorted(b["index"]) == [1, 2, 3] and b["skipped"].sum() == 1


def test_skip_count_is_carried_across_a_checkpoint(data, tmp_path):
  """`data/skipped_records` continues after a resume: the count is saved with the
  iterator state (through the real Orbax + Grain checkpoint handler) and restored."""
  import jax.numpy as jnp
  import ml_collections
  from jest_pod import checkpoint
  from jest_pod.train import feed

  path = _shard(data)
  _flip(path, open(path, "rb").read().find(helpers_data.png(7)) + 100)
  cfg = _config(data)
  make = lambda: feed.SkipCounter(pipeline.make_train_iterator(
      cfg, global_batch_size=4, seed=0, process_index=0, process_count=1))
  it = make()
  for _ in range(12):  # 48 positions: record 7 is read once in each of 2 epochs
    next(it)
  assert it.skipped == 2
  state = {"w": jnp.ones(3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
  ckpt.save(12, state, feed.IteratorState(it.get_state()),
            ml_collections.ConfigDict({"x": 1}), force=True)
  ckpt.wait()
  resumed = make()
  step, _ = ckpt.restore_latest(state, resumed)
  ckpt.close()
  assert step == 12 and resumed.skipped == 2
  np.testing.assert_array_equal(next(resumed)["index"], next(it)["index"])
  # A bare Grain state (before the count was saved) is refused, not read as a count of 0.
  old = make()
  with pytest.raises(ValueError, match="no skip count .* start a new --workdir"):
    old.set_state(json.dumps(it._iter.get_state()).encode())  # pylint: disable=protected-access


# The probes CI runs: one of each class that needs no training (a few seconds each); the
# rest run by hand (`tools/probes`, `tools/probes --heavy`), each with a unit-test twin.
CI_PROBES = ("verify_count_plus_100", "ingest_into_a_file", "manifest_dotdot",
             "cache_meta_torn", "export_over_source", "export_nan", "npz_header_4tib",
             "embed_batch_size_zero", "float_inf")


def test_the_probe_harness_runs(tmp_path):
  """tools/probes (the end-to-end view of these failure classes): its quick probes run
  clean here."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, os.path.join(root, "tools", "probes"), "--only",
                         ",".join(CI_PROBES)],
                        capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                        env=dict(os.environ, PYTHONPATH=root))
  assert done.returncode == 0, done.stdout + done.stderr
  assert f"{len(CI_PROBES)} clean, 0 NOT CLEAN" in done.stdout

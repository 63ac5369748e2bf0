"""Ingest of the three input formats on tiny real files mixing good and damaged inputs."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from jest_pod.data import cli, ingest, manifest, records


def _png(color=(200, 30, 30), size=(80, 40)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(size=(100, 100)) -> bytes:
  buf = io.BytesIO()
  arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).save(buf, "JPEG")
  return buf.getvalue()


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _check_output(out, expect_n, expect_skipped):
  m = manifest.read(out)
  manifest.validate(m, out, check_sha256=True)
  assert m["num_examples"] == expect_n
  assert m["skipped"] == expect_skipped
  recs = list(ingest.iter_records(out))
  assert len(recs) == expect_n
  assert len({r.id for r in recs}) == expect_n
  for r in recs:
    im = Image.open(io.BytesIO(r.image))
    assert im.mode == "RGB" and max(im.size) <= m["image_max_side"]
    assert r.text and r.source
  # Atomic writes leave nothing temporary behind.
  assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.startswith(".")]
  return m, recs


def test_folder(tmp_path):
  src = tmp_path / "in"
  _write(str(src / "a" / "cat.png"), _png(size=(200, 100)))
  _write(str(src / "a" / "cat.txt"), "a red cat\nsecond line ignored\n")
  _write(str(src / "b" / "deep" / "dog.jpg"), _jpeg())
  _write(str(src / "b" / "deep" / "dog.txt"), "a dog")
  _write(str(src / "bad.png"), b"\x89PNG not really")           # undecodable
  _write(str(src / "bad.txt"), "broken")
  _write(str(src / "empty.png"), _png())
  _write(str(src / "empty.txt"), "  \n")                         # empty caption
  _write(str(src / "nocap.png"), _png())                         # missing caption
  _write(str(src / "orphan.txt"), "no image for me")             # missing image
  _write(str(src / "a" / "cat.webp"), _jpeg())                   # duplicate id a/cat
  out = str(tmp_path / "out")
  m, recs = _check_output(
      ingest.ingest(str(src), out, workers=1, shard_size=1) and out, 2,
      {"undecodable_image": 1, "empty_caption": 1, "missing_caption": 1, "missing_image": 1,
       "duplicate_id": 1})
  by_id = {r.id: r for r in recs}
  assert by_id["a/cat"].text == "a red cat"
  assert Image.open(io.BytesIO(by_id["a/cat"].image)).size == (64, 32)  # aspect kept
  assert Image.open(io.BytesIO(by_id["a/cat"].image)).format == "PNG"
  assert Image.open(io.BytesIO(by_id["b/deep/dog"].image)).format == "JPEG"
  assert [s["file"] for s in m["shards"]] == ["out-00000-of-00002.array_record",
                                              "out-00001-of-00002.array_record"]
  assert m["sources"] == ["out"] and m["source_counts"] == {"out": 2}
  assert os.path.exists(os.path.join(out, "skipped.tsv"))


def test_tsv_labels_and_parallel(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(ingest, "CHUNK", 2)  # several tasks, so the process pool is used
  caplog.set_level("INFO")
  d = tmp_path / "in"
  for i in range(7):
    _write(str(d / "img" / f"{i}.png"), _png(color=(i * 30, 0, 0)))
  _write(str(d / "img" / "bad.png"), b"garbage")
  rows = ["image_path\tcaption\tclass"]
  rows += [f"img/{i}.png\tpicture {i}\t{'cat' if i % 2 else 'dog'}" for i in range(6)]
  rows += ["img/missing.png\tgone\tcat", "img/bad.png\tbad\tdog", "img/0.png\tagain\tdog",
           "img/6.png\t\tcat", "only_one_column"]
  _write(str(d / "list.tsv"), "\n".join(rows) + "\n")
  out = str(tmp_path / "out")
  ingest.ingest(str(d / "list.tsv"), out, workers=2, name="pairs")
  m, recs = _check_output(out, 6, {"missing_image": 1, "undecodable_image": 1,
                                   "duplicate_id": 1, "empty_caption": 1, "malformed_line": 1})
  assert m["class_names"] == ["cat", "dog"]
  assert {r.id: r.label for r in recs}["img/1"] == 0
  assert [r.id for r in recs] == [f"img/{i}" for i in range(6)]  # input order kept
  assert "wrote 6 examples" in caplog.text


def test_csv(tmp_path):
  _write(str(tmp_path / "x.png"), _png())
  _write(str(tmp_path / "list.csv"), 'x.png,"a caption, with a comma"\n')
  out = str(tmp_path / "out")
  ingest.ingest(str(tmp_path / "list.csv"), out, workers=1)
  _, recs = _check_output(out, 1, {})
  assert recs[0].text == "a caption, with a comma"


def _add(tf, name, data):
  if isinstance(data, str):
    data = data.encode()
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def test_webdataset(tmp_path):
  d = tmp_path / "shards"
  d.mkdir()
  with tarfile.open(d / "00000.tar", "w") as tf:
    _add(tf, "000000000.jpg", _jpeg())
    _add(tf, "000000000.txt", "a photo")
    _add(tf, "000000000.json", json.dumps({"key": "000000000", "caption": "a photo"}))
    _add(tf, "000000001.png", _png())
    _add(tf, "000000001.json", json.dumps({"caption": "caption from json"}))
    _add(tf, "000000002.webp", b"RIFF broken webp")           # undecodable
    _add(tf, "000000002.txt", "x")
    _add(tf, "000000003.txt", "image missing")                # missing image
    _add(tf, "000000004.png", _png())
    _add(tf, "000000004.txt", "")                             # empty caption
  with tarfile.open(d / "00001.tar", "w") as tf:
    _add(tf, "000000000.png", _png())                         # duplicate id
    _add(tf, "000000000.txt", "dup")
    _add(tf, "000000005.png", _png())                         # no caption at all
  out = str(tmp_path / "out")
  ingest.ingest(str(d), out, workers=1)
  _, recs = _check_output(out, 2, {"undecodable_image": 1, "missing_image": 1,
                                   "empty_caption": 1, "duplicate_id": 1, "missing_caption": 1})
  assert {r.id: r.text for r in recs} == {"000000000": "a photo", "000000001": "caption from json"}


def test_overwrite_refusal_and_cli(tmp_path, capsys):
  src = tmp_path / "in"
  _write(str(src / "x.png"), _png())
  _write(str(src / "x.txt"), "x")
  out = str(tmp_path / "out")
  assert cli.main(["ingest", "--input", str(src), "--output", out, "--workers", "1"]) == 0
  assert cli.main(["ingest", "--input", str(src), "--output", out, "--workers", "1"]) == 1
  assert "--overwrite" in capsys.readouterr().err
  with pytest.raises(ingest.OutputNotEmptyError):
    ingest.ingest(str(src), out, workers=1)
  assert cli.main(["ingest", "--input", str(src), "--output", out, "--workers", "1",
                   "--overwrite", "--max-side", "16"]) == 0
  m = manifest.read(out)
  assert m["image_max_side"] == 16 and m["num_examples"] == 1


def test_max_side_caps_the_stored_side(tmp_path):
  src = tmp_path / "in"
  _write(str(src / "wide.jpg"), _jpeg(size=(120, 60)))   # downscaled, aspect kept
  _write(str(src / "wide.txt"), "a wide photo")
  _write(str(src / "tall.png"), _png(size=(30, 90)))     # downscaled, aspect kept
  _write(str(src / "tall.txt"), "a tall drawing")
  _write(str(src / "small.png"), _png(size=(20, 10)))    # smaller: stored as is
  _write(str(src / "small.txt"), "a small drawing")
  out = str(tmp_path / "out")
  assert cli.main(["ingest", "--input", str(src), "--output", out, "--workers", "1",
                   "--max-side", "40"]) == 0
  m, recs = _check_output(out, 3, {})
  assert m["image_max_side"] == 40
  sizes = {r.id: Image.open(io.BytesIO(r.image)).size for r in recs}
  assert sizes == {"wide": (40, 20), "tall": (13, 40), "small": (20, 10)}
  assert Image.open(io.BytesIO(recs[[r.id for r in recs].index("wide")].image)).format == "JPEG"


def test_crash_leaves_no_manifest(tmp_path, monkeypatch):
  src = tmp_path / "in"
  for i in range(3):
    _write(str(src / f"{i}.png"), _png())
    _write(str(src / f"{i}.txt"), "c")
  out = str(tmp_path / "out")

  def boom(*a, **k):
    raise RuntimeError("disk full")
  monkeypatch.setattr(manifest, "write", boom)
  with pytest.raises(RuntimeError):
    ingest.ingest(str(src), out, workers=1, shard_size=1)
  assert not manifest.is_complete(out)
  with pytest.raises(manifest.ManifestError, match="jest-pod data ingest"):
    manifest.read(out)


def test_manifest_errors(tmp_path):
  with pytest.raises(manifest.ManifestError, match="does not exist"):
    manifest.read(str(tmp_path / "nope"))
  with pytest.raises(manifest.ManifestError, match="no manifest.json"):
    manifest.read(str(tmp_path))
  (tmp_path / "manifest.json").write_text("{}")
  with pytest.raises(manifest.ManifestError, match="lacks fields"):
    manifest.read(str(tmp_path))


def test_records_roundtrip_with_encoder():
  data = records.encode(records.Record(image=_png(), text="t", id="i", source="s", label=3))
  assert records.decode(data).label == 3


# ------------------------------------------------ issue 23: one writer, cleaned up, reproducible


def _inputs(src, n):
  for i in range(n):
    _write(str(src / f"{i}.png"), _png((i * 40 % 256, 30, 30)))
    _write(str(src / f"{i}.txt"), f"picture {i}")


class _FullDisk:
  """ArrayRecordWriter on a disk that fills after ROOM records: writes and the close fail
  as Riegeli's do (a RuntimeError naming the file), leaving the partial file behind."""
  ROOM = 3
  written = 0

  def __init__(self, path, options):
    del options
    self.path, self.f = path, open(path, "wb")

  def write(self, data):
    if _FullDisk.written >= self.ROOM:
      raise RuntimeError(f"write() failed: No space left on device; writing {self.path}; "
                         "at byte 4096")
    _FullDisk.written += 1
    self.f.write(data)

  def close(self):
    self.f.close()
    if _FullDisk.written >= self.ROOM:
      raise RuntimeError(f"write() failed: No space left on device; writing {self.path}; "
                         "Failed to close chunk_writer")


def test_disk_full_during_ingest_is_one_line_and_the_rerun_needs_no_overwrite(
    tmp_path, monkeypatch, capsys):
  from array_record.python import array_record_module
  src, out = tmp_path / "in", str(tmp_path / "out")
  _inputs(src, 6)
  args = ["ingest", "--input", str(src), "--output", out, "--workers", "1", "--shard-size", "2"]
  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", _FullDisk)
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0] and out in err[0], err
  assert "no --overwrite needed" in err[0]
  assert os.listdir(out) == []  # nothing left behind: no temp shard, skip list or lock
  monkeypatch.undo()
  assert cli.main(args) == 0
  _check_output(out, 6, {})


@pytest.mark.parametrize("leftover", ["marker", "temp_shards_only"])
def test_a_killed_write_is_cleared_by_the_rerun_without_overwrite(tmp_path, leftover):
  """What kill -9 leaves (temp shards, a stale lock; with this version also the marker)
  is ours to clear; a folder holding anything else still needs --overwrite."""
  src, out = tmp_path / "in", tmp_path / "out"
  _inputs(src, 3)
  out.mkdir()
  (out / ".out-00000.array_record.tmp").write_bytes(b"half a shard")
  (out / ".lock").write_text(json.dumps({"host": ingest.lockfile.socket.gethostname(),
                                         "pid": 2**22 + 7}))  # no such pid
  if leftover == "marker":
    (out / "skipped.tsv").write_text("reason\tinput\tdetail\n")
    (out / ingest.INCOMPLETE).write_text("pid 1\n")
  ingest.ingest(str(src), str(out), workers=1)
  _check_output(str(out), 3, {})
  (out / "notes.txt").write_text("the user's")
  (out / manifest.MANIFEST).unlink()
  with pytest.raises(ingest.OutputNotEmptyError):
    ingest.ingest(str(src), str(out), workers=1)


def test_a_second_writer_into_the_same_folder_is_refused(tmp_path, capsys):
  from jest_pod.data import builders
  src, out = tmp_path / "in", str(tmp_path / "out")
  _inputs(src, 2)
  with ingest.lock_output(out):  # this live test process is the other writer
    with pytest.raises(ingest.OutputBusyError, match=f"pid {os.getpid()}.*another --output"):
      ingest.ingest(str(src), out, workers=1)
    with pytest.raises(ingest.OutputBusyError):
      builders.build("emoji", out, limit=1)
    assert cli.main(["build", "emoji", "--output", out, "--limit", "1"]) == 1
    assert "in use by another data set writer" in capsys.readouterr().err
    assert os.listdir(out) == [".lock"]  # the refused writers touched nothing
  assert ingest.ingest(str(src), out, workers=1)["num_examples"] == 2


def test_rebuilt_shards_are_byte_identical(tmp_path):
  """The same input and arguments give the same shard sha256, in any process: the
  reference cache fingerprints shards by sha256 (protobuf's map order used to follow a
  per-process hash seed)."""
  import subprocess
  import sys
  code = ("import hashlib, sys; from jest_pod.data import records; sys.stdout.write("
          "hashlib.sha256(records.encode(records.Record(image=b'png', text='a caption', "
          "id='x/1', source='web:junk_image', label=3))).hexdigest())")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True).stdout for _ in range(4)}
  assert len(digests) == 1, digests
  src = tmp_path / "in"
  _inputs(src, 4)
  a = ingest.ingest(str(src), str(tmp_path / "a"), name="x", workers=1, shard_size=2)
  b = ingest.ingest(str(src), str(tmp_path / "b"), name="x", workers=1, shard_size=2)
  assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
  src, out = tmp_path / "in", tmp_path / "out"
  _inputs(src, 1)
  out.write_text("a file")
  assert cli.main(["ingest", "--input", str(src), "--output", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{out}" in err[0] and "not a folder" in err[0], err

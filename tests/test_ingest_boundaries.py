"""Ingest stays inside its inputs: symlinks, list paths, size limits, odd bytes, cut tars."""

import gzip
import io
import os
import resource
import tarfile

from PIL import Image

from jest_pod.data import cli, ingest, ingest_read, manifest


def _png(color=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), color).save(buf, "PNG")
  return buf.getvalue()


def _write(path, data):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode())


def _skips(out):
  """(manifest skipped counts, skipped.tsv rows as (reason, input, detail))."""
  m = manifest.read(str(out))
  manifest.validate(m, str(out), check_sha256=True)
  p = os.path.join(str(out), "skipped.tsv")
  rows = []
  if os.path.exists(p):
    with open(p, encoding="utf-8") as f:
      rows = [tuple(line.rstrip("\n").split("\t")) for line in f][1:]
  return m, rows


def _texts(out):
  return {r.id: r.text for r in ingest.iter_records(str(out))}


class _Zeros:
  """A file of n zero bytes, never held in memory."""

  def __init__(self, n):
    self.left = n

  def read(self, k=-1):
    k = self.left if k < 0 else min(k, self.left)
    self.left -= k
    return bytes(k)


def _add(tf, name, data):
  data = data.encode() if isinstance(data, str) else data
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tf.addfile(info, io.BytesIO(data))


def test_symlinks_skipped_by_default_followed_with_flag(tmp_path):
  outside = tmp_path / "outside"
  _write(outside / "secret.txt", "root:x:0:0 secret")
  _write(outside / "pics" / "far.png", _png())
  _write(outside / "pics" / "far.txt", "a far picture")
  src = tmp_path / "in"
  _write(src / "ok.png", _png())
  _write(src / "ok.txt", "fine")
  _write(src / "leak.png", _png())
  os.symlink(outside / "secret.txt", src / "leak.txt")        # caption link out of the folder
  os.symlink(outside / "pics", src / "linked")                # folder link out of the folder
  os.symlink(src, src / "loop")                               # a loop back to the root
  out = tmp_path / "out"
  ingest.ingest(str(src), str(out), workers=1)
  m, rows = _skips(out)
  assert m["skipped"] == {"symlink": 3}
  assert {r[1] for r in rows} == {"leak.txt", "linked/", "loop/"}
  assert _texts(out) == {"ok": "fine"}                        # /etc/passwd-style leak gone

  out2 = tmp_path / "out2"
  assert cli.main(["ingest", "--input", str(src), "--output", str(out2), "--workers", "1",
                   "--follow-symlinks"]) == 0
  m, rows = _skips(out2)
  assert m["skipped"] == {"symlink": 1}                       # the loop, walked once only
  assert rows[0][1] == "loop/" and "already walked" in rows[0][2]
  assert _texts(out2) == {"ok": "fine", "leak": "root:x:0:0 secret",
                          "linked/far": "a far picture"}
  assert m["build"]["follow_symlinks"] is True


def test_tsv_relative_paths_resolve_against_the_list_folder(tmp_path, monkeypatch):
  lists = tmp_path / "data" / "lists"
  _write(lists / "img" / "a.png", _png())
  _write(tmp_path / "data" / "shared" / "b.png", _png())
  elsewhere = tmp_path / "cwd"
  _write(elsewhere / "img" / "only_in_cwd.png", _png())       # must not be found via the cwd
  _write(lists / "list.tsv", "img/a.png\tcaption a\n../shared/b.png\tcaption b\n"
                             "img/only_in_cwd.png\tcwd decoy\n")
  os.symlink(tmp_path / "data" / "shared" / "b.png", lists / "img" / "link.png")
  with open(lists / "list.tsv", "a") as f:
    f.write("img/link.png\tvia a link\n")
  monkeypatch.chdir(elsewhere)
  out = tmp_path / "out"
  ingest.ingest(os.path.relpath(lists / "list.tsv"), str(out), workers=1)
  m, rows = _skips(out)
  assert _texts(out) == {"img/a": "caption a", "../shared/b": "caption b"}
  assert m["skipped"] == {"missing_image": 1, "symlink": 1}
  assert ("missing_image", "list.tsv:3") == rows[0][:2]
  assert ("symlink", "list.tsv:4") == rows[1][:2]


def test_tsv_absolute_path(tmp_path, monkeypatch):
  _write(tmp_path / "tree" / "x.png", _png())
  _write(tmp_path / "lists" / "l.csv", f"{tmp_path / 'tree' / 'x.png'},an absolute path\n")
  monkeypatch.chdir(tmp_path / "lists")
  out = tmp_path / "out"
  ingest.ingest(str(tmp_path / "lists" / "l.csv"), str(out), workers=1)
  m, _ = _skips(out)
  assert m["skipped"] == {}
  assert list(_texts(out).values()) == ["an absolute path"]


def test_big_tar_members_skipped_unread(tmp_path, monkeypatch):
  big = 80 * 1024 * 1024
  for name, mode in (("shard.tar.gz", "w:gz"), ("plain.tar", "w")):
    with tarfile.open(tmp_path / name, mode) as tf:
      _add(tf, "a.png", _png())
      _add(tf, "a.txt", "small a")
      info = tarfile.TarInfo("big.png")
      info.size = big
      tf.addfile(info, _Zeros(big))                           # ~80 KB once gzipped
      _add(tf, "big.txt", "big one")
      _add(tf, "c.png", _png())
      _add(tf, "c.txt", "x" * (ingest_read.MAX_CAPTION_BYTES + 1))  # caption over the limit
  assert os.path.getsize(tmp_path / "shard.tar.gz") < 1024 * 1024
  extracted = []
  real_extract = tarfile.TarFile.extractfile
  monkeypatch.setattr(tarfile.TarFile, "extractfile",
                      lambda self, m: extracted.append(m.name) or real_extract(self, m))
  for name in ("shard.tar.gz", "plain.tar"):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = tmp_path / f"out-{name}"
    ingest.ingest(str(tmp_path / name), str(out), workers=1, max_image_bytes=1024 * 1024)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert growth_mib < 40, growth_mib
    m, rows = _skips(out)
    assert m["skipped"] == {"image_too_large": 1, "caption_too_large": 1}
    assert {r[:2] for r in rows} == {("image_too_large", f"{name}:big"),
                                     ("caption_too_large", f"{name}:c")}
    assert _texts(out) == {"a": "small a"}
  assert "big.png" not in extracted and "c.txt" not in extracted


def test_folder_image_over_the_limit_is_not_read(tmp_path, monkeypatch):
  src = tmp_path / "in"
  _write(src / "big.png", _png() + bytes(4096))
  _write(src / "big.txt", "big")
  _write(src / "ok.png", _png())
  _write(src / "ok.txt", "ok")
  out = tmp_path / "out"
  ingest.ingest(str(src), str(out), workers=1, max_image_bytes=len(_png()) + 10)
  m, rows = _skips(out)
  assert m["skipped"] == {"image_too_large": 1} and rows[0][1] == "big.png"


def test_bad_caption_bytes_counted(tmp_path):
  src = tmp_path / "in"
  for stem, cap in (("good", b"caf\xc3\xa9"), ("latin1", b"caf\xe9 au lait"),
                    ("bell", b"ring \x07 the bell"), ("tab", b"a\tb")):
    _write(src / f"{stem}.png", _png())
    _write(src / f"{stem}.txt", cap)
  with open(os.fsencode(src) + b"/caf\xe9.png", "wb") as f:  # a file name that is not UTF-8
    f.write(_png())
  out = tmp_path / "out"
  ingest.ingest(str(src), str(out), workers=1)
  m, rows = _skips(out)
  assert m["skipped"] == {"caption_not_utf8": 1, "caption_control_chars": 1, "name_not_utf8": 1}
  assert {r[:2] for r in rows} == {("caption_not_utf8", "latin1.txt"),
                                   ("caption_control_chars", "bell.txt"),
                                   ("name_not_utf8", "caf\\xe9.png")}
  assert _texts(out) == {"good": "café", "tab": "a\tb"}

  with tarfile.open(tmp_path / "s.tar", "w") as tf:           # the same rule in tars
    _add(tf, "k.png", _png())
    _add(tf, "k.txt", b"\xff\xfe")
  out2 = tmp_path / "out2"
  ingest.ingest(str(tmp_path / "s.tar"), str(out2), workers=1)
  assert _skips(out2)[0]["skipped"] == {"caption_not_utf8": 1}


def test_tsv_non_utf8_line_skipped_with_file_and_line(tmp_path):
  for i in range(3):
    _write(tmp_path / f"{i}.png", _png())
  _write(tmp_path / "pairs.tsv", b"image\tcaption\n0.png\tzero\n1.png\tone \xff\xfe bad\n"
                                  b"2.png\ttwo\n2.png\tbell \x07\n")
  out = tmp_path / "out"
  ingest.ingest(str(tmp_path / "pairs.tsv"), str(out), workers=1)
  m, rows = _skips(out)
  assert _texts(out) == {"0": "zero", "2": "two"}
  assert m["skipped"] == {"caption_not_utf8": 1, "duplicate_id": 1}
  assert rows[0][:2] == ("caption_not_utf8", "pairs.tsv:3")


def _three_pair_tar() -> tuple[bytes, int]:
  """An uncompressed tar of pairs a, b, c and the offset of c.png's header."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tf:
    for k in "abc":
      _add(tf, f"{k}.png", _png())
      _add(tf, f"{k}.txt", f"pair {k}")
  data = buf.getvalue()
  with tarfile.open(fileobj=io.BytesIO(data)) as tf:
    return data, tf.getmember("c.png").offset


def test_tar_truncated_inside_a_later_header(tmp_path):
  data, c_header = _three_pair_tar()
  cases = {"in-header.tar": data[:c_header + 100],               # tarfile stops silently here
           "at-boundary.tar": data[:c_header],
           "in-header.tar.gz": gzip.compress(data[:c_header + 100]),
           # level 0: gzip header (10 B) + block header (5 B) + the tar bytes, cut in c's header
           "gz-stream-cut.tar.gz": gzip.compress(data, compresslevel=0)[:15 + c_header + 100]}
  for name, blob in cases.items():
    _write(tmp_path / name, blob)
    out = tmp_path / f"out-{name}"
    ingest.ingest(str(tmp_path / name), str(out), workers=1)
    m, rows = _skips(out)
    assert m["skipped"] == {"truncated_tar": 1}, name
    assert rows[0][1] == str(tmp_path / name)
    assert "'b.txt'" in rows[0][2], rows[0]                   # the last member read
    assert _texts(out) == {"a": "pair a", "b": "pair b"}, name
  _write(tmp_path / "whole.tar", data)                          # no false alarm on a whole tar
  ingest.ingest(str(tmp_path / "whole.tar"), str(tmp_path / "out-whole"), workers=1)
  assert _skips(tmp_path / "out-whole")[0]["skipped"] == {}

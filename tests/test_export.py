"""`jest-pod export` never destroys (issue 32, item 2): an output equal to, inside or
containing the checkpoint is refused; --overwrite replaces only an earlier export (its
marker); a big_vision export is one folder; writes are atomic and readers refuse an
export that did not finish. Runs on the committed HF fixture (no training)."""

import json
import os
import shutil
import subprocess
import sys
import types

import ml_collections
import pytest

from jest_pod.interop import InteropError, big_vision, export, formats, guard, hf

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "siglip_tiny")


@pytest.fixture
def src(tmp_path):
  """A copy of the fixture, the checkpoint each test must not damage."""
  dst = str(tmp_path / "src")
  shutil.copytree(HF, dst)
  return dst


def _listing(folder):
  return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _one_line_error(capsys, *texts):
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  for t in texts:
    assert t in err, err
  return err


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_over_the_checkpoint_is_refused(src, tmp_path, capsys, where):
  """Before: `export W --output W --overwrite` deleted W with exit 0."""
  before = _listing(src)
  out = {"same": src, "inside": os.path.join(src, "sub"), "containing": str(tmp_path)}[where]
  assert export.main([src, "--format", "hf", "--output", out, "--overwrite"]) == 1
  _one_line_error(capsys, "the checkpoint", os.path.realpath(src), "--output")
  assert _listing(src) == before


def test_output_over_a_workdir_from_its_step_folder_is_refused(tmp_path):
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "40").mkdir(parents=True)
  with pytest.raises(export.ExportError, match=r"is inside the checkpoint .*wd"):
    export.check_output(str(wd / "hf"), str(wd / "checkpoints" / "40"), overwrite=True,
                        fmt="hf")


def test_overwrite_replaces_only_an_export(src, tmp_path, capsys):
  """Before: --overwrite removed any existing folder."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  assert export.main([src, "--format", "hf", "--output", str(mine), "--overwrite"]) == 1
  _one_line_error(capsys, str(mine), guard.MARKER, "--overwrite replaces only")
  assert (mine / "notes.txt").read_text() == "keep me"
  # An earlier export is replaced, whole.
  out = str(tmp_path / "out")
  assert export.main([src, "--format", "hf", "--output", out]) == 0
  assert export.main([src, "--format", "hf", "--output", out]) == 1
  _one_line_error(capsys, "--overwrite")
  with open(os.path.join(out, "stale.txt"), "w") as f:
    f.write("from before")
  assert export.main([src, "--format", "big_vision", "--output", out, "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == sorted([big_vision.NPZ, hf.SPIECE, guard.MARKER])
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporaries left
  # An empty folder holds nothing to destroy: used without --overwrite.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert export.main([src, "--format", "hf", "--output", str(empty)]) == 0


def test_big_vision_export_is_one_folder_that_readers_take(src, tmp_path, capsys):
  """Before: the npz was written at --output and spiece.model beside it, overwriting
  another model's tokenizer there."""
  other = tmp_path / "spiece.model"
  other.write_bytes(b"another model's tokenizer")
  out = str(tmp_path / "bv")
  assert export.main([src, "--format", "big_vision", "--output", out]) == 0
  assert other.read_bytes() == b"another model's tokenizer"
  assert sorted(os.listdir(tmp_path)) == ["bv", "spiece.model", "src"]
  assert sorted(os.listdir(out)) == sorted([big_vision.NPZ, hf.SPIECE, guard.MARKER])
  marker = json.load(open(os.path.join(out, guard.MARKER)))
  assert marker["complete"] is True and marker["format"] == "big_vision"
  assert marker["files"][big_vision.NPZ] == os.path.getsize(os.path.join(out, big_vision.NPZ))
  a, b = formats.load(src), formats.load(out)  # `--reference FOLDER` reads it
  assert b.kind == "big_vision"
  assert formats.params_digest(a.params) == formats.params_digest(b.params)
  assert a.preprocessing.fingerprint() == b.preprocessing.fingerprint()
  c = formats.load(os.path.join(out, big_vision.NPZ))  # and the npz itself
  assert formats.params_digest(c.params) == formats.params_digest(a.params)
  strip = lambda c: {k: v for k, v in c.model.to_dict().items() if k != "scan_layers"}
  assert strip(formats.load_config(out)) == strip(formats.load_config(src))
  # An .npz output name is refused, with the folder to name instead.
  assert export.main([src, "--format", "big_vision", "--output", str(tmp_path / "x.npz")]) == 1
  _one_line_error(capsys, "x.npz", "a folder", f"--output {tmp_path / 'x'}")
  assert not os.path.exists(tmp_path / "x.npz")


def _crash_on(monkeypatch, module, name, after=0):
  """`module.name` raises on its call number `after` (0-based): an export dying mid-write."""
  real, calls = getattr(module, name), []

  def dying(*a, **k):
    calls.append(1)
    if len(calls) > after:
      raise KeyboardInterrupt
    return real(*a, **k)
  monkeypatch.setattr(module, name, dying)


def test_an_interrupted_export_leaves_no_output(src, tmp_path, monkeypatch):
  """Before: an export killed between two files left a folder `embed` accepted."""
  out = str(tmp_path / "out")
  _crash_on(monkeypatch, hf, "_write_json", after=2)  # config + tokenizer config written
  loaded = formats.load(src)
  with pytest.raises(KeyboardInterrupt):
    export.export(loaded, "hf", out)
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary


def test_readers_refuse_an_export_that_did_not_finish(src, tmp_path, monkeypatch):
  """A kill -9 leaves the temporary folder (marker: complete=false); every reader refuses
  it in one line, as they do an export whose files changed since."""
  monkeypatch.setattr(export.shutil, "rmtree", lambda *a, **k: None)  # as after kill -9
  _crash_on(monkeypatch, guard, "write_marker", after=1)  # dies before the final marker
  with pytest.raises(KeyboardInterrupt):
    export.export(formats.load(src), "hf", str(tmp_path / "out"))
  monkeypatch.undo()
  (left,) = [n for n in os.listdir(tmp_path) if n.startswith(".out.export-")]
  left = str(tmp_path / left)
  assert os.path.exists(os.path.join(left, hf.WEIGHTS))  # it looks like an HF folder
  for read in (formats.load, formats.load_config, formats.kind_of, hf.read_folder,
               hf.read_config):
    with pytest.raises(InteropError, match="an incomplete export") as e:
      read(left)
    assert "\n" not in str(e.value) and left in str(e.value)
  # A finished big_vision export whose npz was then truncated, or its tokenizer removed.
  bv = str(tmp_path / "bv")
  export.export(formats.load(src), "big_vision", bv)
  npz = os.path.join(bv, big_vision.NPZ)
  with open(npz, "r+b") as f:
    f.truncate(os.path.getsize(npz) - 10)
  for read in (formats.load, big_vision.read_npz, lambda p: big_vision.read_npz(npz)):
    with pytest.raises(InteropError, match=r"model.npz: \d+ bytes, the export wrote"):
      read(bv)
  os.remove(npz)
  with pytest.raises(InteropError, match="missing from an export"):
    formats.load(bv)


def test_a_killed_exports_temporary_is_swept(src, tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  stale = tmp_path / f".out.export-{int(dead.stdout)}-abcdef"
  stale.mkdir()
  guard.write_marker(str(stale), {"complete": False})
  kept = tmp_path / f".out.export-old-{int(dead.stdout)}-abcdef"  # maybe the only copy
  kept.mkdir()
  export.export(formats.load(src), "hf", str(tmp_path / "out"))
  assert not stale.exists() and kept.exists()


def _flexivit(method):
  config = ml_collections.ConfigDict({"model": {"family": "flexivit"},
                                      "selection": {"method": method}})
  return types.SimpleNamespace(path="workdirs/run", config=config)


@pytest.mark.parametrize("method,example", [("joint", "configs/jest.py:family=siglip"),
                                            ("uniform", "configs/siglip.py:family=siglip")])
def test_the_refusals_example_fits_the_run(method, example):
  """Before: the uniform config was named for a JEST run too."""
  with pytest.raises(export.ExportError) as e:
    export.check_exportable(_flexivit(method))
  assert example in str(e.value) and "config.model.family=siglip" in str(e.value)


def test_a_model_with_non_finite_parameters_is_not_exported(src, tmp_path):
  """Before: export wrote NaN weights with exit 0 (issue 32, item 5)."""
  loaded = formats.load(src)
  leaf = loaded.params["img"]["embedding"]["kernel"]
  leaf.reshape(-1)[3] = float("nan")
  out = str(tmp_path / "out")
  with pytest.raises(export.ExportError, match=r"parameter .*img.*embedding.*kernel.* holds 1 "
                     r"non-finite values .*nothing was written"):
    export.export(loaded, "hf", out)
  assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if "export" in n]

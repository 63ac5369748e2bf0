"""Builders on the real Debian data with --limit (installs the packages when missing)."""

import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from jest_pod.data import cli, ingest, manifest
from jest_pod.data import builders
from jest_pod.data.builders import decoded_hash, demo, emoji, fashion_mnist, openclipart


def _records(d):
  m = manifest.read(d)
  manifest.validate(m, d, check_sha256=True)
  return m, list(ingest.iter_records(d))


def test_emoji(tmp_path):
  out = str(tmp_path / "emoji")
  assert cli.main(["build", "emoji", "--output", out, "--limit", "40", "--workers", "1"]) == 0
  m, recs = _records(out)
  assert m["num_examples"] + sum(m["skipped"].values()) == 40
  assert m["num_examples"] >= 30 and m["sources"] == ["emoji"]
  for r in recs:
    assert r.id.startswith("emoji/") and ":" not in r.text and "_" not in r.text
    im = np.asarray(Image.open(io.BytesIO(r.image)))
    assert im.shape == (64, 64, 3) and im.std() > 5  # drawn, not blank
  assert emoji.caption_of("x", ":man_climbing_medium_skin_tone:") == "man climbing medium skin tone"
  assert emoji.caption_of("\U0001F1EB\U0001F1F7", ":France:") == "flag of France"


def test_openclipart(tmp_path):
  out = str(tmp_path / "clip")
  openclipart.build(out, limit=30, workers=1)
  m, recs = _records(out)
  assert m["num_examples"] + sum(m["skipped"].values()) == 30
  assert len({r.id.split("/")[1] for r in recs}) > 3  # --limit spreads over categories
  assert all(r.text for r in recs)
  meta = openclipart.svg_metadata(
      "/usr/share/openclipart/svg/animals/2_dead_frogs_lumen_desig_01.svg")
  assert meta["title"] == "2 dead frogs" and "frog" in meta["keywords"]
  assert openclipart.clean_title({"title": "Armadillo", "creator": "X"}) == "armadillo"
  assert openclipart.clean_title({"title": "IMG_0001.png", "creator": ""}) == ""


def test_fashion_mnist(tmp_path):
  out = str(tmp_path / "fm")
  fashion_mnist.build(out, limit=50)
  for split in ("train", "test"):
    m, recs = _records(os.path.join(out, split))
    assert m["num_examples"] == 50 and m["class_names"] == fashion_mnist.CLASS_NAMES
    assert all(0 <= r.label < 10 for r in recs)
    assert all(fashion_mnist.CLASS_NAMES[r.label] in r.text for r in recs)
  imgs, labels = fashion_mnist.load_arrays("test")
  assert imgs.shape == (10000, 28, 28) and labels.max() == 9


def test_demo_disjoint_and_damage_counted(tmp_path, caplog):
  out = str(tmp_path / "demo")
  manifests = demo.build(out, limit=60, workers=1, seed=3)
  sets = {}
  for name, m in zip(demo.SETS, manifests):
    assert m["num_examples"] > 0, name
    sets[name] = _records(os.path.join(out, name))[1]
  web_m = manifests[0]
  for damage in demo.DAMAGES:  # every damage kind is present and counted by source
    assert sum(n for s, n in web_m["source_counts"].items() if s.endswith(":" + damage)) > 0
  assert {s.split(":")[0] for s in web_m["sources"]} == {"emoji", "openclipart", "fashion_mnist"}
  assert manifests[2]["class_names"] == fashion_mnist.CLASS_NAMES

  def base_id(rid):
    return rid.split("#")[0]
  train = sets["web"] + sets["curated"]
  evals = sets["eval_fashion"] + sets["eval_retrieval"]
  train_ids = {base_id(r.id) for r in train}
  assert not train_ids & {r.id for r in evals}
  train_hashes = {decoded_hash(r.image) for r in train}
  assert not train_hashes & {decoded_hash(r.image) for r in evals}
  for name in demo.SETS:  # ids unique within each set
    assert len({r.id for r in sets[name]}) == len(sets[name])
  # Curated is clean: every caption is an original one, no damaged source.
  assert all(":" not in r.source for r in sets["curated"])

  # Deterministic, and a rebuild with the same arguments is a no-op.
  mtime = os.path.getmtime(os.path.join(out, "web", manifest.MANIFEST))
  again = demo.build(out, limit=60, workers=1, seed=3)
  assert os.path.getmtime(os.path.join(out, "web", manifest.MANIFEST)) == mtime
  assert [m["shards"] for m in again] == [m["shards"] for m in manifests]
  with pytest.raises(ingest.OutputNotEmptyError, match="--overwrite"):
    demo.build(out, limit=60, workers=1, seed=4)
  other = str(tmp_path / "demo2")
  rebuilt = demo.build(other, limit=60, workers=1, seed=3)
  assert [s["sha256"] for m in rebuilt for s in m["shards"]] == \
      [s["sha256"] for m in manifests for s in m["shards"]]


def test_damage_helpers():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
  dup = demo.near_duplicate(img, rng)
  assert dup.shape == img.shape and not np.array_equal(dup, img)
  names = collections.Counter(demo.filename_caption(rng).rsplit(".", 1)[-1].lower()
                              for _ in range(50))
  assert set(names) <= {"jpg", "png", "webp", "jpeg"}
  assert demo.junk_image(rng).shape == (64, 64, 3)


def test_missing_package_message(monkeypatch):
  from jest_pod.data import system_packages
  monkeypatch.setattr(system_packages, "is_installed", lambda p: False)
  monkeypatch.setattr(system_packages.os, "geteuid", lambda: 1000)
  with pytest.raises(system_packages.MissingPackageError,
                     match="sudo apt-get update && apt-get install -y --no-install-recommends x"):
    system_packages.ensure(["x"])
  monkeypatch.setattr(system_packages.shutil, "which", lambda name: None)
  with pytest.raises(system_packages.MissingPackageError, match="apt-get is not available"):
    system_packages.ensure(["x"])


def test_an_option_the_builder_does_not_take_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="the demo builder takes no --image-size"):
    builders.build("demo", str(tmp_path / "d"), image_size=32)
  assert not os.path.exists(tmp_path / "d")  # refused before anything is written

"""The icons builder on small synthetic sources of the real formats (no network, no Debian
packages): an iconify-style JSON tarball, emojibase data, a theme folder, Freeciv and
KGeography files, a font. One test downloads the real packages, with JEST_POD_NETWORK_TESTS=1."""

import base64
import functools
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading

import matplotlib
import numpy as np
import pytest
from PIL import Image

from jest_pod.data import ingest, manifest
from jest_pod.data.builders import decoded_hash, icons, icons_fetch, icons_render
from jest_pod.data.builders import icons_names
from jest_pod.data.builders import icons_sources as sources
from jest_pod.data.builders.demo import dhash

LIMIT = 100  # per family: above every fixture set's size, below the font's glyph count


# ---------------------------------------------------------------------------------------
# Fixtures: tiny sources in the real layouts.


def _rect(x, y, w, h, colour="currentColor"):
  return f'<path fill="{colour}" d="M{x} {y}h{w}v{h}h-{w}z"/>'


def _stripes(colours, vertical=True, w=640, h=480):
  n = len(colours)
  if vertical:
    return "".join(_rect(i * w // n, 0, w // n, h, c) for i, c in enumerate(colours))
  return "".join(_rect(0, i * h // n, w, h // n, c) for i, c in enumerate(colours))


def _iconify_set(prefix, licence, icons_, width=24, height=24, **extra):
  return {"prefix": prefix, "info": {"name": prefix, "license": {"title": licence,
                                                                 "spdx": licence}},
          "icons": icons_, "width": width, "height": height, **extra}


SWORD = _rect(200, 40, 100, 420) + _rect(100, 300, 300, 60)


def _iconify_sets():
  shapes = {f"shape-{i}": {"body": _rect(2 + i, 3, 6 + 2 * i, 10 + i % 5)
                                   + _rect(14, 2 + i, 6, 6)} for i in range(8)}
  tiny = _iconify_set("tiny", "MIT", dict(
      shapes, **{
          "folder-music": {"body": _rect(2, 6, 20, 14) + _rect(2, 4, 8, 3)},
          "file-24": {"body": _rect(5, 2, 14, 20)},
          "flag-variant": {"body": _rect(4, 2, 2, 20) + _rect(6, 2, 12, 8)},
          # The same drawing as game-icons' sword: a held-out picture under another name.
          "twin-of-sword": {"body": SWORD, "width": 512, "height": 512},
          "secret": {"body": _rect(1, 1, 5, 5), "hidden": True}}),
      categories={"Files & Folders": ["folder-music", "file-24"]})
  flag = _iconify_set("flag", "MIT", {
      "fr-4x3": {"body": _stripes(["#0055a4", "#fff", "#ef4135"])},
      "de-4x3": {"body": _stripes(["#000", "#d00", "#ffce00"], vertical=False)},
      "gb-eng-4x3": {"body": _rect(0, 0, 640, 480, "#fff") + _rect(280, 0, 80, 480, "#c00")},
  }, width=640, height=480)
  twemoji = _iconify_set("twemoji", "CC-BY-4.0", {
      "flag-france": {"body": _stripes(["#00f", "#fff", "#f00"], w=36, h=36)},
      "grinning-face": {"body": '<circle cx="18" cy="18" r="16" fill="#fc0"/>'},
      "pirate-flag": {"body": _rect(2, 2, 30, 20, "#000")},
  }, width=36, height=36, chars={"1f1eb-1f1f7": "flag-france", "1f600": "grinning-face"})
  game = _iconify_set("game-icons", "CC-BY-3.0", {
      "sword": {"body": SWORD},
      "sword-copy": {"body": SWORD},
      "shield": {"body": '<circle cx="256" cy="256" r="200"/>'},
  }, width=512, height=512)
  pinhead = _iconify_set("pinhead", "CC0-1.0", {"airplane": {"body": _rect(1, 6, 13, 3)}},
                         width=15, height=15)
  cbi = _iconify_set("cbi", "CC-BY-NC-SA-4.0", {"a": {"body": _rect(1, 1, 9, 9)},
                                                "b": {"body": _rect(3, 3, 9, 9)}})
  noto = _iconify_set("noto", "Apache-2.0", {"x": {"body": _rect(1, 1, 9, 9)}})
  return [tiny, flag, twemoji, game, pinhead, cbi, noto]


def _png(draw, size=(48, 32)) -> bytes:
  im = Image.new("RGBA", size, (0, 0, 0, 0))
  draw(im)
  buf = io.BytesIO()
  im.save(buf, "PNG")
  return buf.getvalue()


def _tricolour(im, colours=((0, 85, 164), (255, 255, 255), (239, 65, 53))):
  w, h = im.size
  for i, c in enumerate(colours):
    im.paste(c + (255,), (i * w // 3, 0, (i + 1) * w // 3, h))


def _disc(im, colour=(188, 0, 45)):
  from PIL import ImageDraw
  w, h = im.size
  im.paste((255, 255, 255, 255), (0, 0, w, h))
  ImageDraw.Draw(im).ellipse((w // 3, h // 4, 2 * w // 3, 3 * h // 4), fill=colour + (255,))


def _box(seed):
  def draw(im):
    rng = np.random.default_rng(seed)
    for _ in range(4):
      x, y = rng.integers(0, 12, 2)
      im.paste(tuple(int(v) for v in rng.integers(0, 200, 3)) + (255,),
               (int(x), int(y), int(x) + 6, int(y) + 5))
  return draw


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  with open(path, mode) as f:
    f.write(data)


def _tarball(path, files: dict) -> str:
  """A .tgz with `package/<name>` members; returns its SRI sha512."""
  with tarfile.open(path, "w:gz") as tar:
    for name, data in sorted(files.items()):
      data = data if isinstance(data, bytes) else data.encode()
      info = tarfile.TarInfo("package/" + name)
      info.size, info.mtime = len(data), 0
      tar.addfile(info, io.BytesIO(data))
  with open(path, "rb") as f:
    return "sha512-" + base64.b64encode(hashlib.sha512(f.read()).digest()).decode()


def _emojibase():
  en = [{"label": "flag: France", "hexcode": "1F1EB-1F1F7", "tags": ["FR", "flag"]},
        {"label": "flag: Germany", "hexcode": "1F1E9-1F1EA", "tags": ["DE", "flag"]},
        {"label": "flag: Japan", "hexcode": "1F1EF-1F1F5", "tags": ["JP", "flag"]},
        {"label": "flag: European Union", "hexcode": "1F1EA-1F1FA", "tags": ["EU", "flag"]},
        {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"]},
        {"label": "rocket", "hexcode": "1F680", "tags": ["space"]}]
  de = [{"label": "grinsendes Gesicht", "hexcode": "1F600"},
        {"label": "Rakete", "hexcode": "1F680"}]
  return {"en/data.json": json.dumps(en), "de/data.json": json.dumps(de),
          "package.json": '{"license": "MIT"}'}


def _packages(root):
  """{npm name: (version, tarball files)} of the fixture packages."""
  webp = {}
  for name, draw in (("1f600", _box(7)), ("1f680", _box(8)), ("1f1ef-1f1f5", _disc)):
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(draw, (64, 64)))).save(buf, "WEBP")
    webp[f"assets/{name}.webp"] = buf.getvalue()
  carbon_svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
                '{}</svg>')
  return {
      "@iconify/json": ("9.9.9", {f"json/{s['prefix']}.json": json.dumps(s)
                                  for s in _iconify_sets()}),
      "emojibase-data": ("9.9.9", _emojibase()),
      "@lobehub/fluent-emoji-3d": ("9.9.9", dict(webp, **{"package.json": '{"license":"MIT"}'})),
      "@carbon/pictograms": ("9.9.9", {
          "metadata.json": json.dumps({
              "icons": [{"name": "rocket", "friendlyName": "Rocket", "aliases": ["launch"]},
                        {"name": "globe", "friendlyName": "Globe"}],
              "categories": [{"name": "Travel", "members": ["rocket"]}]}),
          "svg/rocket.svg": carbon_svg.format(_rect(12, 2, 8, 28)),
          "svg/globe.svg": carbon_svg.format('<circle cx="16" cy="16" r="12"/>'),
          "package.json": '{"license": "Apache-2.0"}'}),
  }


def make_sources(root: str) -> sources.Config:
  """Writes every fixture source under `root`; returns a Config that reads them."""
  cache = os.path.join(root, "npm")
  os.makedirs(cache)
  pins = {}
  for name, (version, files) in _packages(root).items():
    path = os.path.join(cache, f"{name.replace('/', '__')}-{version}.tgz")
    pins[name] = (version, _tarball(path, files))
  svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">{}</svg>'
  theme = os.path.join(root, "icons", "Tiny")
  _write(os.path.join(theme, "scalable", "apps", "accessories-calculator.svg"),
         svg.format(_rect(3, 1, 10, 14)))
  _write(os.path.join(theme, "scalable", "emblems", "emblem-flag.svg"),
         svg.format(_rect(3, 3, 9, 6)))
  _write(os.path.join(theme, "48x48", "places", "user-home.png"), _png(_box(1), (48, 48)))
  _write(os.path.join(theme, "16x16", "places", "user-home.png"), _png(_box(2), (16, 16)))
  _write(os.path.join(theme, "48x48", "places", "folder-music-symbolic.png"),
         _png(_box(3), (48, 48)))
  os.symlink("user-home.png", os.path.join(theme, "48x48", "places", "gnome-home.png"))
  fc = os.path.join(root, "freeciv")
  _write(os.path.join(fc, "nation", "french.ruleset"),
         '[nation_french]\nname=_("French")\nlegend=_("...")\nflag="france"\n')
  _write(os.path.join(fc, "nation", "pirates.ruleset"), 'name=_("Pirates")\nflag="pirate"\n')
  _write(os.path.join(fc, "flags", "france-large.png"), _png(_tricolour, (44, 30)))
  _write(os.path.join(fc, "flags", "france-shield-large.png"), _png(_tricolour, (19, 19)))
  _write(os.path.join(fc, "flags", "pirate-large.png"), _png(_box(4), (44, 30)))
  kg = os.path.join(root, "kgeography")
  div = "<division><name>{}</name><flag>{}</flag></division>"
  _write(os.path.join(kg, "world.kgm"), "<map>" + div.format("France", "france.png")
         + div.format("Japan", "japan.png") + "</map>")
  _write(os.path.join(kg, "usa.kgm"), "<map>" + div.format("Georgia", "usa_georgia.png") + "</map>")
  _write(os.path.join(kg, "flags", "france.png"), _png(_tricolour, (300, 200)))
  _write(os.path.join(kg, "flags", "japan.png"), _png(_disc, (300, 200)))
  _write(os.path.join(kg, "flags", "usa_georgia.png"), _png(_box(5), (300, 200)))
  silk = os.path.join(root, "silk")
  for i, name in enumerate(["car_delete", "accept", "cog_add", "page_white"]):
    _write(os.path.join(silk, "16x16", name + ".png"), _png(_box(10 + i), (16, 16)))
  # Same pixels as KGeography's French flag: must leave training.
  _write(os.path.join(silk, "16x16", "tricolour.png"), _png(_tricolour, (300, 200)))
  osm = os.path.join(root, "osm")
  _write(os.path.join(osm, "amenity", "bank.svg"), svg.format(_rect(2, 5, 12, 8)))
  _write(os.path.join(osm, "shields", "motorway.svg"), svg.format(_rect(1, 1, 14, 14)))
  font = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
  return sources.Config(npm_cache=cache, npm=pins, icons_root=os.path.join(root, "icons"),
                        themes={"tiny-icon-theme": "Tiny"}, fonts={"dejavu": font},
                        freeciv=fc, kgeography=kg, silk=silk, osm=osm,
                        doc_root=os.path.join(root, "doc"), install=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  return make_sources(str(tmp_path_factory.mktemp("icon_sources")))


@pytest.fixture(scope="module")
def built(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("icons"))
  return out, icons.build(out, limit=LIMIT, workers=1, seed=1, config=src)


def _records(d):
  m = manifest.read(d)
  manifest.validate(m, d, check_sha256=True)
  return m, list(ingest.iter_records(d))


def _shas(manifests):
  return [s["sha256"] for m in manifests for s in m["shards"]]


# ---------------------------------------------------------------------------------------


def test_clean_names_and_rules():
  c = icons_names.clean_name
  assert c("folder-music") == "folder music"
  assert c("edit-copy-symbolic") == "edit copy"
  assert c("media-playlist-repeat-symbolic-rtl") == "media playlist repeat"
  assert c("file-24") == "file" and c("add-24-filled") == "add filled"
  assert c("numeric-24-circle") == "numeric 24 circle" and c("battery-020") == "battery 020"
  assert c("org.gnome.Nautilus") == "nautilus" and c("FolderMusic") == "folder music"
  assert c("stock_folder") == "folder" and c("gtk-open") == "open"
  assert icons.clean_category("Files & Folders") == "files and folders"
  assert icons_names.names_flag("flag variant") and icons_names.names_flag("crossed flags")
  assert not icons_names.names_flag("flagged mail") and not icons_names.names_flag("inflagrante")
  assert icons_names.non_commercial("CC-BY-NC-SA-4.0") and icons_names.non_commercial("CC BY-NC 4.0")
  assert not icons_names.non_commercial("CC-BY-SA-4.0") and not icons_names.non_commercial("MIT")
  assert icons_names.country_key("St. Kitts & Nevis") == icons_names.country_key("saint-kitts-nevis")
  assert icons_names.regional_code("1f1eb-1f1f7") == "fr" and icons_names.regional_code("1f600") == ""
  assert icons_names.hex_key("1F3F4-E0067_E0062") == "1f3f4-e0067-e0062"
  assert icons_names.hex_key("2716-fe0f") == "2716"


def test_sets_counts_licences_and_captions(built):
  out, manifests = built
  ms = dict(zip(icons.SETS, manifests))
  web = ms["web"]
  assert web["build"]["builder"] == "icons" and web["image_max_side"] == 64
  # Licences: every used set's, the non-commercial and excluded sets left out with reasons.
  assert web["licences"]["iconify/tiny"] == "MIT"
  assert web["excluded_sets"] == {"iconify/cbi": "non_commercial_licence",
                                  "iconify/noto": "excluded_set"}
  assert web["excluded_licences"]["iconify/cbi"] == "CC-BY-NC-SA-4.0"
  assert web["skipped"]["non_commercial_licence"] == 2 and web["skipped"]["excluded_set"] == 1
  assert web["skipped"]["theme_alias_of_same_file"] == 1  # gnome-home -> user-home
  assert web["skipped"]["near_eval_image"] >= 2  # twin-of-sword, silk tricolour
  assert ms["eval_retrieval"]["licences"]["carbon/carbon-pictograms"] == "Apache-2.0"
  for damage in icons.DAMAGES:  # every kind present and counted by source
    assert sum(n for s, n in web["source_counts"].items() if s.endswith(":" + damage)) > 0
  assert {s.split(":")[0] for s in web["sources"]} == {
      "iconify", "theme", "unicode", "fluent3d", "silk", "osm"}
  _, recs = _records(os.path.join(out, "web"))
  texts = {r.id: r.text for r in recs}
  for r in recs:
    assert np.asarray(Image.open(io.BytesIO(r.image))).shape == (64, 64, 3)
  by_id = {r.id: r for r in recs}
  assert "iconify/tiny/secret" not in texts  # hidden icons are not visible icons
  assert "iconify/tiny/folder-music" in texts and "theme/tiny-icon-theme/user-home" in texts
  held = {r.id for r in _records(os.path.join(out, "eval_web"))[1]}
  checked = 0
  for rid, allowed in (("iconify/tiny/file-24", {"file", "file icon", "file, files and folders",
                                                 "files and folders: file"}),
                       ("iconify/twemoji/grinning-face", {
                           "grinning face", "grinning face icon", "grinning face (face, grin)",
                           "grinsendes Gesicht"})):
    if rid in held:  # held out for eval_web: not in training
      continue
    r = by_id[rid]  # every training picture is in web once, under its own id
    if ":" not in r.source:  # a damaged caption is the damage's, checked below
      assert r.text in allowed, r
      checked += 1
  assert checked  # at least one of the two kept a caption variant of its own name
  item = {"name": "grinning-face", "family": "iconify", "category": "Smileys & People",
          "tags": ["face", "grin"], "labels": [["de", "grinsendes Gesicht"]]}
  assert set(icons.caption_variants(item)) == {
      "grinning face", "grinning face icon", "grinning face, smileys and people",
      "smileys and people: grinning face", "grinning face (face, grin)", "grinsendes Gesicht"}
  assert icons.caption_variants(dict(item, category="Flags")) == [
      "grinning face", "grinning face", "grinning face icon", "grinning face (face, grin)",
      "grinsendes Gesicht"]  # no variant names a flag
  _, cur = _records(os.path.join(out, "curated"))
  assert cur and all(":" not in r.source for r in cur)
  assert {r.source for r in cur} <= {"iconify", "unicode", "fluent3d", "silk", "osm"}


def test_eval_sets_are_disjoint_from_training(built):
  out, manifests = built
  sets = {s: _records(os.path.join(out, s))[1] for s in icons.SETS}
  m_flags = manifests[2]
  names = m_flags["class_names"]
  assert m_flags["class_codes"] == ["de", "fr", "jp"] and names == ["Germany", "France", "Japan"]
  got = {(r.source, r.label) for r in sets["eval_flags"]}
  assert ("iconify/flag", 0) in got and ("iconify/flag", 1) in got  # de, fr
  assert ("iconify/twemoji", 1) in got and ("fluent3d/fluent-emoji-3d", 2) in got
  assert ("kgeography/kgeography-flags", 2) in got and ("freeciv/freeciv-flags", 1) in got
  for r in sets["eval_flags"]:
    assert r.text == f"flag of {names[r.label]}"
  assert not any("usa_georgia" in r.id or "gb-eng" in r.id for r in sets["eval_flags"])
  retr = sets["eval_retrieval"]
  assert {r.id.split("/")[1] if r.id.startswith("iconify/") else r.id.split("/")[0]
          for r in retr} == {"game-icons", "pinhead", "carbon"}
  assert len({r.text for r in retr}) == len(retr)
  assert not ({"iconify/game-icons/sword", "iconify/game-icons/sword-copy"}
              <= {r.id for r in retr})  # one picture per dHash group

  web_eval = sets["eval_web"]  # unseen pictures of the training collections
  assert web_eval and len({r.text for r in web_eval}) == len(web_eval)
  assert {r.source for r in web_eval} <= {s.split(":")[0] for s in manifests[0]["sources"]}
  # Held-out pictures and their near-duplicate groups are counted where they left from.
  assert manifests[0]["skipped"]["web_eval"] == len(web_eval)
  assert (manifests[0]["skipped"].get("web_eval_group", 0)
          == manifests[4]["skipped"].get("same_group_left_training", 0))

  train = sets["web"] + sets["curated"]
  evals = sets["eval_flags"] + sets["eval_retrieval"] + web_eval
  base = lambda rid: rid.split("#")[0]
  assert not {base(r.id) for r in train} & {r.id for r in evals}
  assert not {decoded_hash(r.image) for r in train} & {decoded_hash(r.image) for r in evals}

  def d(r):
    return dhash(np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")))
  assert not {d(r) for r in train} & {d(r) for r in evals}  # near-duplicates grouped
  for r in train:  # each set's rule
    assert not icons_names.names_flag(r.text), r
    assert not r.id.startswith(("iconify/game-icons/", "iconify/pinhead/", "carbon/")), r
  for name in icons.SETS:
    assert len({r.id for r in sets[name]}) == len(sets[name])


def test_deterministic_reuse_and_resume(src, built, tmp_path, monkeypatch):
  out, manifests = built
  mtime = os.path.getmtime(os.path.join(out, "web", manifest.MANIFEST))
  again = icons.build(out, limit=LIMIT, workers=1, seed=1, config=src)  # no-op
  assert os.path.getmtime(os.path.join(out, "web", manifest.MANIFEST)) == mtime
  assert _shas(again) == _shas(manifests)
  with pytest.raises(ingest.OutputNotEmptyError, match="--overwrite"):
    icons.build(out, limit=LIMIT, workers=1, seed=2, config=src)

  # Killed while drawing: a part fails after the first ones are cached; the rerun draws
  # only the rest. Then killed while writing eval_flags: the rerun draws nothing.
  loads = []
  real_parts = sources.parts

  def counting_parts(*a, fail=None, **k):
    ps, eb = real_parts(*a, **k)
    for p in ps:
      def load(p=p, inner=p.load):
        loads.append(p.key)
        if p.key == fail:
          raise KeyboardInterrupt("killed")
        return inner()
      p.load = load
    return ps, eb

  other = str(tmp_path / "resumed")
  monkeypatch.setattr(sources, "parts", functools.partial(counting_parts, fail="theme/tiny"))
  with pytest.raises(KeyboardInterrupt):  # in-process drawing: each part cached when done
    icons.build(other, limit=LIMIT, workers=1, seed=1, config=src)
  first = list(loads)
  assert first[-1] == "theme/tiny" and "iconify/tiny" in first
  loads.clear()
  monkeypatch.setattr(sources, "parts", counting_parts)
  real_write = icons.write_set

  def failing_write(out_dir, name, *a, **k):
    if name == "eval_flags":
      raise KeyboardInterrupt("killed")
    return real_write(out_dir, name, *a, **k)

  monkeypatch.setattr(icons, "write_set", failing_write)
  with pytest.raises(KeyboardInterrupt):
    icons.build(other, limit=LIMIT, workers=2, seed=1, config=src)
  assert "iconify/tiny" not in loads and "theme/tiny" in loads  # cached parts not redrawn
  loads.clear()
  monkeypatch.setattr(icons, "write_set", real_write)
  resumed = icons.build(other, limit=LIMIT, workers=2, seed=1, config=src)
  assert loads == []
  # Same seed, other machine state (2 workers, two interruptions): identical shards.
  assert _shas(resumed) == _shas(manifests)
  changed = icons.build(str(tmp_path / "seed2"), limit=LIMIT, workers=1, seed=2, config=src)
  assert _shas(changed) != _shas(manifests)


def test_npm_download_is_checked_and_cached(src, tmp_path, monkeypatch):
  served = tmp_path / "registry"
  name, (version, integrity) = "@carbon/pictograms", src.npm["@carbon/pictograms"]
  tgz = os.path.join(src.npm_cache, f"@carbon__pictograms-{version}.tgz")
  target = served / "@carbon" / "pictograms" / "-"
  target.mkdir(parents=True)
  data = open(tgz, "rb").read()
  (target / f"pictograms-{version}.tgz").write_bytes(data)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("JEST_POD_NPM_REGISTRY", f"http://127.0.0.1:{server.server_port}")
    cache = str(tmp_path / "cache")
    path = icons_fetch.fetch(name, version, integrity, cache)
    assert open(path, "rb").read() == data
    with open(path, "r+b") as f:  # damaged in the cache: fetched again
      f.write(b"garbage")
    assert icons_fetch.check_integrity(icons_fetch.fetch(name, version, integrity, cache),
                                       integrity)
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode()
    os.unlink(path)
    with pytest.raises(icons_fetch.IntegrityError, match="pinned integrity"):
      icons_fetch.fetch(name, version, wrong, cache)
    assert os.path.exists(path + ".bad") and not os.path.exists(path)
  finally:
    server.shutdown()
  assert icons_fetch.tarball_url("@iconify/json", "2.2.535", "https://r") == \
      "https://r/@iconify/json/-/json-2.2.535.tgz"


def test_part_cache_round_trip(tmp_path):
  path = str(tmp_path / "x.part")
  items = [{"id": "a", "name": "é", "png": b"\x89PNG1"}, {"id": "b", "name": "b", "png": b""}]
  icons_render.write_part(path, items, {"blank_image": 1}, "MIT", 0.5)
  got, skipped, licence = icons_render.read_part(path)
  assert got == items and skipped == {"blank_image": 1} and licence == "MIT"
  open(path, "r+b").truncate(os.path.getsize(path) - 2)
  with pytest.raises(ValueError, match="truncated"):
    icons_render.read_part(path)


@pytest.mark.skipif(not os.environ.get("JEST_POD_NETWORK_TESTS"),
                    reason="downloads 140 MB from registry.npmjs.org; set JEST_POD_NETWORK_TESTS=1")
def test_real_packages(tmp_path, monkeypatch):
  """The real npm packages (pinned, sha512-checked) through the real command."""
  from jest_pod.data import cli
  out = str(tmp_path / "icons")
  monkeypatch.setenv("JEST_POD_NPM_CACHE", str(tmp_path / "npm"))
  assert cli.main(["build", "icons", "--output", out, "--limit", "300", "--workers", "2"]) == 0
  for s in icons.SETS:
    m, recs = _records(os.path.join(out, s))
    assert m["num_examples"] > 0, s
  m = manifest.read(os.path.join(out, "web"))
  assert m["excluded_sets"]["iconify/cbi"] == "non_commercial_licence"
  assert m["licences"]["iconify/mdi"] == "Apache-2.0"
  assert len(manifest.read(os.path.join(out, "eval_flags"))["class_names"]) == 249

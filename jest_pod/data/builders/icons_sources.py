"""The icons builder's sources: what to draw, with which name (icons.py has the recipe).

Each source is cut into `Part`s (an iconify set, a Debian theme, a font package, ...): the
unit that is rendered and cached as one file, so an interrupted build resumes per part.
`Part.load()` returns (entries, skipped counts, licence); an `Entry` holds the drawing job
and the raw human-written name plus what captions can use (category, tags, labels in other
languages) and the flag facts the split needs (`flag`: ISO 3166-1 class, `flaggy`: the
name names a flag).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
import re
import unicodedata
import xml.etree.ElementTree as ET
from typing import Callable

from fontTools.ttLib import TTFont

from jest_pod.data.builders import icons_fetch
from jest_pod.data.builders.icons_names import (
    Emojibase, clean_name, hex_key, names_flag, non_commercial, regional_code, spread)

# Pinned npm packages: version and the registry's dist.integrity (sha512).
NPM = {
    "@iconify/json": ("2.2.535", "sha512-nAV60ACUSHwnsb6fsp+letHlNkrwO4vzBtcC6B4EDHErQQfezk7E3n"
                      "JdnwJjve6OCfMNO0uVT5Vrgna9/NCmXw=="),
    "@lobehub/fluent-emoji-3d": ("1.1.0", "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0"
                                 "me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g=="),
    "emojibase-data": ("17.0.0", "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g88"
                       "2LTpmEpyhBNEC0m2SEmItljHsTygjA=="),
    "@carbon/pictograms": ("12.82.0", "sha512-H3FKwJ1S9N5oKSn3NYQOOoh2mVNuT5u2oWHSHAdUKbzAI6YYlI24"
                           "v83dw0IP2/NA+AoyTglgMggBH8zQ2HAO+A=="),
}
NPM_MEMBERS = {
    "@iconify/json": ["package/json/*.json"],
    "@lobehub/fluent-emoji-3d": ["package/assets/*.webp", "package/package.json"],
    "emojibase-data": ["package/*/data.json", "package/package.json"],
    "@carbon/pictograms": ["package/svg/*.svg", "package/metadata.json", "package/package.json"],
}
# Debian icon themes: package -> the theme folder under /usr/share/icons that is its own
# (the others a package ships are colour variants, mostly links to the same pictures).
THEMES = {
    "papirus-icon-theme": "Papirus", "obsidian-icon-theme": "Obsidian",
    "numix-icon-theme": "Numix", "deepin-icon-theme": "bloom", "breeze-icon-theme": "breeze",
    "paper-icon-theme": "Paper", "faenza-icon-theme": "Faenza",
    "elementary-xfce-icon-theme": "elementary-xfce", "yaru-theme-icon": "Yaru",
    "moka-icon-theme": "Moka", "oxygen-icon-theme": "oxygen", "mate-icon-theme": "mate",
    "adwaita-icon-theme": "Adwaita", "suru-icon-theme": "suru", "gnome-icon-theme": "gnome",
    "tango-icon-theme": "Tango", "lxde-icon-theme": "nuoveXT2",
}
FONT_PACKAGES = {"noto-core": "fonts-noto-core", "symbola": "fonts-symbola"}
OTHER_PACKAGES = ["freeciv-data", "kgeography-data", "famfamfam-silk", "openstreetmap-carto-common"]
DEBIAN_PACKAGES = list(THEMES) + list(FONT_PACKAGES.values()) + OTHER_PACKAGES

EXCLUDED_SETS = {"noto"}  # Noto Color Emoji is the demo's emoji source: keep the pools apart
FLAG_SETS = {"flag", "circle-flags", "flagpack", "cif"}  # every icon is a flag
HELD_OUT_SETS = {"game-icons", "pinhead", "carbon-pictograms"}  # eval_retrieval only
CONTEXTS = {"apps": "application", "applications": "application", "places": "place",
            "mimetypes": "file type", "mimes": "file type", "devices": "device",
            "status": "status", "actions": "action", "categories": "category",
            "emblems": "emblem", "emotes": "emoticon", "stock": "stock", "panel": "panel"}
SKIP_CONTEXTS = {"animations", "cursors"}


@dataclasses.dataclass
class Config:
  """Where the sources are; tests point these at small fixtures."""
  npm_cache: str = dataclasses.field(default_factory=icons_fetch.default_cache)
  npm: dict = dataclasses.field(default_factory=lambda: dict(NPM))
  icons_root: str = "/usr/share/icons"
  themes: dict = dataclasses.field(default_factory=lambda: dict(THEMES))
  fonts: dict = dataclasses.field(default_factory=lambda: {
      "noto-core": "/usr/share/fonts/truetype/noto/*-Regular.ttf",
      "symbola": "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"})
  freeciv: str = "/usr/share/games/freeciv"
  kgeography: str = "/usr/share/kgeography"
  silk: str = "/usr/share/icons/silk"
  osm: str = "/usr/share/openstreetmap-carto-common/symbols"
  doc_root: str = "/usr/share/doc"
  install: bool = True  # install missing Debian packages (system_packages.ensure)
  families: tuple = ("iconify", "theme", "unicode", "fluent3d", "carbon", "freeciv",
                     "kgeography", "silk", "osm")

  def npm_dir(self, name: str) -> str:
    """The extracted package folder (downloaded and checked on first use)."""
    version, integrity = self.npm[name]
    tgz = icons_fetch.fetch(name, version, integrity, self.npm_cache)
    dest = os.path.join(self.npm_cache, "extracted", f"{name.replace('/', '__')}-{version}")
    return os.path.join(icons_fetch.extract(tgz, NPM_MEMBERS[name], dest), "package")


@dataclasses.dataclass
class Entry:
  """One picture to draw.

  job: ("svg", text, view box width, height) | ("file", path) | ("glyph", font path, char).
  """
  id: str
  job: tuple
  name: str
  category: str = ""
  tags: tuple = ()
  labels: tuple = ()  # ((language, label), ...)
  flag: str = ""  # ISO 3166-1 alpha-2 (lower case) when this is a country flag
  flaggy: bool = False  # the name names a flag: never in training

  def meta(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("job")
    return d


@dataclasses.dataclass
class Part:
  key: str  # "<family>/<set>", unique
  family: str
  set: str
  estimate: int  # pictures, for the ETA
  load: Callable[[], tuple[list[Entry], dict, str]]


# ---------------------------------------------------------------------------------------
# iconify: one part per icon set.


def iconify_svg(body: str, left: float, top: float, width: float, height: float) -> str:
  return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
          f'viewBox="{left} {top} {width} {height}" width="{width}" height="{height}">{body}</svg>')


def _iconify_part(path: str, prefix: str, limit: int | None, eb: Emojibase):
  with open(path, encoding="utf-8") as f:
    d = json.load(f)
  info = d.get("info") or {}
  lic = info.get("license") or {}
  licence = lic.get("spdx") or lic.get("title") or "unknown"
  visible = sorted(n for n, v in d["icons"].items() if not v.get("hidden"))
  if prefix in EXCLUDED_SETS:
    return [], {"excluded_set": len(visible)}, licence
  if non_commercial(licence) or non_commercial(lic.get("title") or ""):
    return [], {"non_commercial_licence": len(visible)}, licence
  dw, dh = d.get("width", 16), d.get("height", 16)
  dl, dt = d.get("left", 0), d.get("top", 0)
  category = {}
  for cat, members in sorted((d.get("categories") or {}).items()):
    for m in members:
      category.setdefault(m, cat)
  hex_of = {n: h for h, n in (d.get("chars") or {}).items()}
  out = []
  for name in spread(visible, limit):
    ic = d["icons"][name]
    w, h = ic.get("width", dw), ic.get("height", dh)
    svg = iconify_svg(ic["body"], ic.get("left", dl), ic.get("top", dt), w, h)
    e = Entry(id=f"iconify/{prefix}/{name}", job=("svg", svg, w, h), name=name,
              category=category.get(name, ""))
    hk = hex_key(hex_of.get(name, ""))
    if hk in eb.by_hex:
      label, tags, labels = eb.by_hex[hk]
      e.tags, e.labels = tags, labels
    if prefix in FLAG_SETS:  # 'fr', 'fr-4x3', 'lang-fr', 'gb-eng': all flags, some countries
      code = re.sub(r"-(\d+x\d+)$", "", name)
      e.flaggy, e.flag = True, code if code in eb.classes else ""
    else:
      e.flag = regional_code(hk)
      e.flag = e.flag if e.flag in eb.classes else ""
      if names_flag(clean_name(name)):
        e.flaggy = True
        e.flag = e.flag or eb.code_of(name)
    e.flaggy = e.flaggy or bool(e.flag)
    out.append(e)
  return out, {}, licence


def iconify_parts(cfg: Config, limit: int | None, eb: Emojibase) -> list[Part]:
  root = os.path.join(cfg.npm_dir("@iconify/json"), "json")
  files = sorted(glob.glob(os.path.join(root, "*.json")))
  per_set = None if limit is None else max(1, math.ceil(limit / max(len(files), 1)))
  parts = []
  for path in files:
    prefix = os.path.basename(path)[:-5]
    est = max(1, os.path.getsize(path) // 1200)  # ~1.2 kB of JSON per icon
    parts.append(Part(f"iconify/{prefix}", "iconify", prefix, min(est, per_set or est),
                      lambda p=path, x=prefix: _iconify_part(p, x, per_set, eb)))
  return parts


# ---------------------------------------------------------------------------------------
# Debian icon themes: one part per theme, one picture per distinct file.


def _size_of(parts: list[str]) -> float:
  for p in parts:
    if p == "scalable":
      return math.inf
    m = re.match(r"^(\d+)(x\d+)?(@\d+x)?$", p)
    if m:
      return int(m.group(1))
  return 0


def _theme_part(package: str, root: str, limit: int | None, image_size: int, doc_root: str):
  best = {}  # name -> (rank, path, context)
  for dirpath, dirs, files in os.walk(root):
    dirs.sort()
    rel = os.path.relpath(dirpath, root).split(os.sep)
    if SKIP_CONTEXTS & set(rel):
      continue
    size = _size_of(rel)
    context = next((CONTEXTS.get(p, p) for p in rel if p not in (".", "scalable")
                    and not re.match(r"^\d", p)), "")
    for f in sorted(files):
      stem, ext = os.path.splitext(f)
      if ext.lower() not in (".svg", ".svgz", ".png", ".xpm"):
        continue
      vector = ext.lower() in (".svg", ".svgz")
      # Vector first; else the smallest raster at least image_size, else the largest.
      rank = (0, 0) if vector else ((1, size) if size >= image_size else (2, -size))
      cur = best.get(stem)
      if cur is None or rank < cur[0]:
        best[stem] = (rank, os.path.join(dirpath, f), context)
  by_file, broken = {}, 0
  for name in sorted(best):
    _, path, context = best[name]
    if not os.path.exists(path):  # a link to a file the package does not ship
      broken += 1
      continue
    by_file.setdefault(os.path.realpath(path), []).append((name, path, context))
  out = []
  for real in sorted(by_file, key=lambda r: min(n for n, _, _ in by_file[r])):
    # The file's own name first; names that are links to it become tags (aliases).
    names = sorted(by_file[real], key=lambda x: (os.path.islink(x[1]), x[0]))
    name, path, context = names[0]
    e = Entry(id=f"theme/{package}/{name}", job=("file", real), name=name, category=context,
              tags=tuple(n for n, _, _ in names[1:6]))
    e.flaggy = names_flag(clean_name(name))
    out.append(e)
  skipped = {"theme_alias_of_same_file": sum(len(v) - 1 for v in by_file.values()),
             "broken_link": broken}
  return spread(out, limit), skipped, icons_fetch.debian_licence(package, doc_root)


def theme_parts(cfg: Config, limit: int | None, image_size: int) -> list[Part]:
  per = None if limit is None else max(1, math.ceil(limit / max(len(cfg.themes), 1)))
  parts = []
  for package, theme in sorted(cfg.themes.items()):
    root = os.path.join(cfg.icons_root, theme)
    if not os.path.isdir(root):
      raise FileNotFoundError(f"icon theme folder {root} missing although {package} is "
                              f"installed; check `dpkg -L {package}`")
    short = package.replace("-icon-theme", "").replace("-theme-icon", "")
    parts.append(Part(f"theme/{short}", "theme", short, per or 4000,
                      lambda p=package, r=root: _theme_part(p, r, per, image_size, cfg.doc_root)))
  return parts


# ---------------------------------------------------------------------------------------
# Unicode characters drawn with Noto (core) and Symbola; caption = the character's name.


def _char_name(cp: int) -> str:
  ch = chr(cp)
  if unicodedata.category(ch)[0] in "CZ":  # controls, formats, spaces: nothing to see
    return ""
  name = unicodedata.name(ch, "")
  # CJK ideographs, Hangul syllables, Tangut...: names that are only a code point.
  if not name or re.search(r"-[0-9A-F]{4,6}$", name) or name.startswith("HANGUL SYLLABLE"):
    return ""
  return name.lower()


def _font_order(path: str) -> tuple:
  base = os.path.basename(path)
  first = ["NotoSans-Regular.ttf", "NotoSansSymbols-Regular.ttf", "NotoSansSymbols2-Regular.ttf",
           "NotoSansMath-Regular.ttf", "NotoMusic-Regular.ttf"]
  return (first.index(base) if base in first else len(first), "Serif" in base, base)


def _cmap(path: str) -> dict:
  with TTFont(path, lazy=True, fontNumber=0) as tt:
    return tt.getBestCmap() or {}


def _unicode_part(font_set: str, fonts: list[str], earlier: list[str], limit: int | None,
                  doc_root: str):
  """Code points of `fonts` that no font of an earlier set (`earlier`) draws."""
  taken = set()
  for path in earlier:
    taken.update(_cmap(path))
  chosen, skipped = {}, collections.Counter()
  for path in sorted(fonts, key=_font_order):
    for cp in sorted(_cmap(path)):
      if cp in taken or cp in chosen:
        continue
      taken.add(cp)
      if _char_name(cp):
        chosen[cp] = path
      else:
        skipped["no_character_name"] += 1
  out = []
  for cp in spread(sorted(chosen), limit):
    name = _char_name(cp)
    out.append(Entry(id=f"unicode/{cp:04X}", job=("glyph", chosen[cp], chr(cp)), name=name,
                     category=unicodedata.category(chr(cp)), flaggy=names_flag(name)))
  return out, dict(skipped), icons_fetch.debian_licence(FONT_PACKAGES.get(font_set, font_set),
                                                       doc_root)


def unicode_parts(cfg: Config, limit: int | None) -> list[Part]:
  parts, earlier = [], []
  for font_set, pattern in cfg.fonts.items():
    fonts = sorted(glob.glob(pattern))
    parts.append(Part(f"unicode/{font_set}", "unicode", font_set, limit or 20000,
                      lambda s=font_set, f=fonts, e=list(earlier):
                      _unicode_part(s, f, e, limit, cfg.doc_root)))
    earlier += fonts
  return parts


# ---------------------------------------------------------------------------------------
# npm picture packages: Fluent 3D emoji (WebP), Carbon pictograms (SVG, held out).


def _fluent_part(root: str, limit: int | None, eb: Emojibase):
  out, skipped = [], {"no_emoji_name": 0}
  for path in spread(sorted(glob.glob(os.path.join(root, "assets", "*.webp"))), limit):
    hk = hex_key(os.path.basename(path)[:-5])
    if hk not in eb.by_hex:
      skipped["no_emoji_name"] += 1
      continue
    label, tags, labels = eb.by_hex[hk]
    code = regional_code(hk)
    e = Entry(id=f"fluent3d/{hk}", job=("file", path), name=label, tags=tags, labels=labels,
              flag=code if code in eb.classes else "")
    e.flaggy = bool(e.flag) or names_flag(label)
    out.append(e)
  return out, skipped, _npm_licence(root)


def _npm_licence(root: str) -> str:
  try:
    with open(os.path.join(root, "package.json"), encoding="utf-8") as f:
      return str(json.load(f).get("license") or "unknown")
  except OSError:
    return "unknown"


def _carbon_part(root: str, limit: int | None):
  with open(os.path.join(root, "metadata.json"), encoding="utf-8") as f:
    meta = json.load(f)
  category = {}
  for cat in meta.get("categories") or []:
    for m in cat.get("members") or []:
      category.setdefault(m, cat.get("name", ""))
  out, skipped = [], {"missing_file": 0}
  for icon in spread(sorted(meta["icons"], key=lambda i: i["name"]), limit):
    path = os.path.join(root, "svg", icon["name"] + ".svg")
    if not os.path.exists(path):
      skipped["missing_file"] += 1
      continue
    name = icon.get("friendlyName") or icon["name"]
    out.append(Entry(id=f"carbon/{icon['name']}", job=("file", path), name=name,
                     category=category.get(icon["name"], ""),
                     tags=tuple(icon.get("aliases") or ())[:5], flaggy=names_flag(name)))
  return out, skipped, _npm_licence(root)


# ---------------------------------------------------------------------------------------
# Debian picture packages: Freeciv and KGeography flags, famfamfam silk, OSM map symbols.


def _freeciv_part(root: str, limit: int | None, eb: Emojibase, doc_root: str):
  nation_of = {}  # flag file stem -> nation name (rulesets say `flag="france"`)
  for rs in sorted(glob.glob(os.path.join(root, "nation", "*.ruleset"))):
    with open(rs, encoding="utf-8", errors="replace") as f:
      text = f.read()
    flag = re.search(r'^\s*flag\s*=\s*"([^"]+)"', text, re.M)
    name = re.search(r'^\s*name\s*=\s*_\("(?:\?[^:]*:)?([^"]+)"\)', text, re.M)
    if flag and name:
      nation_of.setdefault(flag.group(1), name.group(1))
  out = []
  stems = sorted({os.path.basename(p)[:-len("-large.png")]
                  for p in glob.glob(os.path.join(root, "flags", "*-large.png"))
                  if "-shield" not in os.path.basename(p)})
  for stem in spread(stems, limit):
    nation = nation_of.get(stem, clean_name(stem))
    out.append(Entry(id=f"freeciv/{stem}", job=("file", os.path.join(root, "flags",
                                                                      stem + "-large.png")),
                     name=f"flag of the {nation}", flag=eb.code_of(stem), flaggy=True))
  return out, {}, icons_fetch.debian_licence("freeciv-data", doc_root)


KGEOGRAPHY_COUNTRY_MAPS = ("world.kgm", "europe.kgm", "africa.kgm", "asia.kgm", "ncamerica.kgm",
                           "southamerica.kgm", "oceania.kgm", "caribbean.kgm")


def _kgeography_part(root: str, limit: int | None, eb: Emojibase, doc_root: str):
  flags = {}  # flag file -> (division name, from a map of countries?)
  maps = sorted(glob.glob(os.path.join(root, "*.kgm")),
                key=lambda p: (os.path.basename(p) not in KGEOGRAPHY_COUNTRY_MAPS, p))
  for kgm in maps:
    try:
      tree = ET.parse(kgm)
    except ET.ParseError:
      continue
    for div in tree.iter("division"):
      name, flag = div.findtext("name"), div.findtext("flag")
      if name and flag and os.path.exists(os.path.join(root, "flags", flag)):
        flags.setdefault(flag, (name.strip(), os.path.basename(kgm) in KGEOGRAPHY_COUNTRY_MAPS))
  out = []
  for flag in spread(sorted(flags), limit):
    name, country = flags[flag]
    # Only maps of countries name countries: usa.kgm's Georgia is not the country.
    code = eb.code_of(name) if country else ""
    out.append(Entry(id=f"kgeography/{flag}", job=("file", os.path.join(root, "flags", flag)),
                     name=f"flag of {name}", flag=code, flaggy=True))
  return out, {}, icons_fetch.debian_licence("kgeography-data", doc_root)


def _files_part(family: str, package: str, root: str, pattern: str, limit, doc_root, skip=()):
  out = []
  paths = [p for p in sorted(glob.glob(os.path.join(root, pattern), recursive=True))
           if not any(os.path.relpath(p, root).startswith(s) for s in skip)]
  for path in spread(paths, limit):
    rel = os.path.relpath(path, root)
    stem = os.path.splitext(rel)[0]
    category = "/".join(c for c in os.path.dirname(rel).split(os.sep) if c and not _size_of([c]))
    category = category.replace("_", " ")
    name = os.path.basename(stem)
    out.append(Entry(id=f"{family}/{stem}", job=("file", path), name=name, category=category,
                     flaggy=names_flag(clean_name(name))))
  return out, {}, icons_fetch.debian_licence(package, doc_root)


# ---------------------------------------------------------------------------------------


def parts(cfg: Config, limit: int | None, image_size: int) -> tuple[list[Part], Emojibase]:
  """Every part of every family in `cfg.families`, in a fixed order, and the emoji data
  (flag classes)."""
  fam = set(cfg.families)
  eb_root = cfg.npm_dir("emojibase-data") if fam & {"iconify", "fluent3d", "freeciv",
                                                    "kgeography"} else None
  eb = Emojibase.load(eb_root)
  out: list[Part] = []
  if "iconify" in fam:
    out += iconify_parts(cfg, limit, eb)
  if "theme" in fam:
    out += theme_parts(cfg, limit, image_size)
  if "unicode" in fam:
    out += unicode_parts(cfg, limit)
  if "fluent3d" in fam:
    root = cfg.npm_dir("@lobehub/fluent-emoji-3d")
    out.append(Part("fluent3d/fluent-emoji-3d", "fluent3d", "fluent-emoji-3d", limit or 3400,
                    lambda r=root: _fluent_part(r, limit, eb)))
  if "carbon" in fam:
    root = cfg.npm_dir("@carbon/pictograms")
    out.append(Part("carbon/carbon-pictograms", "carbon", "carbon-pictograms", limit or 1600,
                    lambda r=root: _carbon_part(r, limit)))
  d = cfg.doc_root
  if "freeciv" in fam:
    out.append(Part("freeciv/freeciv-flags", "freeciv", "freeciv-flags", limit or 560,
                    lambda: _freeciv_part(cfg.freeciv, limit, eb, d)))
  if "kgeography" in fam:
    out.append(Part("kgeography/kgeography-flags", "kgeography", "kgeography-flags", limit or 670,
                    lambda: _kgeography_part(cfg.kgeography, limit, eb, d)))
  if "silk" in fam:
    out.append(Part("silk/famfamfam-silk", "silk", "famfamfam-silk", limit or 1000,
                    lambda: _files_part("silk", "famfamfam-silk", cfg.silk, "**/*.png", limit, d)))
  if "osm" in fam:
    out.append(Part("osm/openstreetmap-carto", "osm", "openstreetmap-carto", limit or 300,
                    lambda: _files_part("osm", "openstreetmap-carto-common", cfg.osm, "**/*.svg",
                                        limit, d, skip=("shields", "generating_patterns",
                                                        "unpaved"))))
  return out, eb

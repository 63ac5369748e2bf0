"""Names for the icons builder: cleaning file and icon names into words, the flag rule,
and emojibase-data (names, tags, other-language labels, the ISO 3166-1 flag classes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata

# Region codes with an emoji flag that are not ISO 3166-1 countries.
NOT_ISO = {"ac", "cp", "cq", "dg", "ea", "ic", "ta", "eu", "un", "xk"}
LANGUAGES = ("de", "es", "fr", "it", "ja", "pt", "ru", "zh")  # emojibase labels used
SIZES = {8, 10, 12, 14, 16, 18, 20, 22, 24, 28, 32, 36, 40, 42, 48, 64, 72, 96, 128, 256, 512}
STYLE_WORDS = {"filled", "fill", "regular", "outline", "outlined", "light", "solid", "bold",
               "thin", "duotone", "line", "sharp", "rounded", "round", "twotone", "color"}
DROP_LEADING = {"gtk", "stock", "gnome", "mate", "xfce", "kde", "lxde"}


# ---------------------------------------------------------------------------------------
# Names.

_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_SIZE = re.compile(r"^([1-9]\d{0,2})(px|dp|x\d{1,3})?$")  # "020" is a level, not a size
_REVERSE_DNS = re.compile(r"^(org|com|net|io|de|fr|app|info|edu)(\.[A-Za-z0-9_-]+){2,}$")


def _is_size(token: str) -> bool:
  m = _SIZE.match(token)
  return bool(m) and (int(m.group(1)) in SIZES or bool(m.group(2)))


def clean_name(raw: str) -> str:
  """A file or icon name as words: 'folder-music' -> 'folder music', 'edit-copy-symbolic'
  -> 'edit copy', 'add-24-filled' -> 'add filled', 'org.gnome.Nautilus' -> 'nautilus'."""
  s = re.sub(r"\.(svgz?|png|xpm|webp)$", "", raw.strip(), flags=re.I)
  if _REVERSE_DNS.match(s):  # application ids: the last component is the name
    s = s.split(".")[-1]
  s = _CAMEL.sub(r"\1 \2", s)
  tokens = [t for t in re.split(r"[\s_\-.:]+", s.lower()) if t]
  while len(tokens) > 1 and tokens[0] in DROP_LEADING:
    tokens.pop(0)
  tokens = [t for t in tokens if t != "symbolic"] or tokens  # a rendering style, not a thing
  while len(tokens) > 1 and (tokens[-1] in ("rtl", "ltr") or _is_size(tokens[-1])):
    tokens.pop()
  # A size between the name and its style ('access-time-20-filled') says nothing.
  tokens = [t for i, t in enumerate(tokens)
            if not (i and _is_size(t) and i + 1 < len(tokens) and tokens[i + 1] in STYLE_WORDS)]
  return " ".join(tokens)


def names_flag(text: str) -> bool:
  """True if a name or caption mentions a flag ('flag', 'flags' as a word)."""
  return bool(re.search(r"(?<![a-z])flags?(?![a-z])", text.lower()))


def country_key(text: str) -> str:
  """A spelling-tolerant key for country names: 'St. Kitts & Nevis' and
  'flag-for-saint-kitts-nevis' both give 'kittsnevis'."""
  s = unicodedata.normalize("NFKD", _CAMEL.sub(r"\1 \2", text))
  s = "".join(c for c in s if not unicodedata.combining(c)).lower().replace("&", " and ")
  s = re.sub(r"[’'`.]", "", s)
  stop = {"and", "the", "of", "flag", "flags", "for", "st", "saint", "islands", "island", "png"}
  return "".join(t for t in re.split(r"[^a-z0-9]+", s) if t and t not in stop)


def spread(items: list, n: int | None) -> list:
  """n items evenly spaced over `items` (all when n is None or large)."""
  if n is None or n >= len(items):
    return list(items)
  step = len(items) / max(n, 1)
  return [items[int(i * step)] for i in range(n)]


def non_commercial(licence: str) -> bool:
  """True for licences that forbid commercial use (CC BY-NC-*, 'non-commercial')."""
  s = licence.upper().replace(" ", "-")
  return "-NC" in s or "NON-COMMERCIAL" in s or "NONCOMMERCIAL" in s


# ---------------------------------------------------------------------------------------
# Emojibase: names, tags and other-language labels by code point; the flag classes.


def hex_key(hexcode: str) -> str:
  """'1F3F4-E0067_E0062' / '2716-fe0f' -> '1f3f4-e0067-e0062' / '2716' (no FE0F)."""
  parts = re.split(r"[-_\s]+", hexcode.lower())
  return "-".join(p for p in parts if p and p != "fe0f")


@dataclasses.dataclass
class Emojibase:
  by_hex: dict  # hex key -> (label, tags, ((lang, label), ...))
  classes: dict  # iso code -> English country name
  keys: dict  # country_key -> iso code

  @classmethod
  def load(cls, root: str | None) -> "Emojibase":
    if root is None:
      return cls({}, {}, {})
    by_hex, classes = {}, {}
    other = {}
    for lang in LANGUAGES:
      path = os.path.join(root, lang, "data.json")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          for e in _flat(json.load(f)):
            other.setdefault(hex_key(e["hexcode"]), []).append((lang, e["label"]))
    with open(os.path.join(root, "en", "data.json"), encoding="utf-8") as f:
      for e in _flat(json.load(f)):
        k = hex_key(e["hexcode"])
        by_hex[k] = (e["label"], tuple(e.get("tags") or ()), tuple(other.get(k, ())))
        code = regional_code(k)
        if code and code not in NOT_ISO and e["label"].lower().startswith("flag:"):
          classes[code] = e["label"].split(":", 1)[1].strip()
    keys = {}
    for code, name in classes.items():
      keys[country_key(name)] = code
      keys[country_key(re.sub(r"\(.*?\)|-.*$", "", name))] = code  # 'Myanmar (Burma)'
    keys.update({k: c for k, c in ALIASES.items() if c in classes})
    return cls(by_hex, dict(sorted(classes.items())), keys)

  def code_of(self, name: str) -> str:
    key = country_key(name)
    return self.keys.get(key, "") if key else ""


# Spellings the emoji labels do not cover (Freeciv, KGeography and icon names).
ALIASES = {"usa": "us", "unitedstatesamerica": "us", "uk": "gb", "britain": "gb",
           "greatbritain": "gb", "unitedkingdom": "gb", "vatican": "va", "czechrepublic": "cz",
           "ivorycoast": "ci", "burma": "mm", "easttimor": "tl", "holland": "nl",
           "swaziland": "sz", "macedonia": "mk", "capeverde": "cv", "lucia": "lc",
           "vincent": "vc", "kitts": "kn", "democraticrepubliccongo": "cd", "drcongo": "cd",
           "republiccongo": "cg", "korea": "kr", "northkorea": "kp", "antigua": "ag",
           "trinidad": "tt", "bosnia": "ba", "saotome": "st", "russianfederation": "ru",
           "turkey": "tr", "macau": "mo", "macao": "mo", "macausarchina": "mo", "hongkong": "hk",
           "hongkongsarchina": "hk"}


def _flat(entries):
  for e in entries:
    yield e
    yield from e.get("skins") or ()


def regional_code(hexkey: str) -> str:
  """'1f1eb-1f1f7' -> 'fr'; '' when not a pair of regional indicators."""
  cps = [int(h, 16) for h in hexkey.split("-") if h]
  if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
    return "".join(chr(c - 0x1F1E6 + ord("a")) for c in cps)
  return ""

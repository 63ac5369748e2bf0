"""Tiny data set folders for tests: ArrayRecord shards + manifest.json (the contract),
written without the ingest tools so the pipeline tests depend on nothing else."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from array_record.python import array_record_module
from PIL import Image

from jest_pod.data import records, sources, tokenizer

COLOURS = ["red", "green", "blue", "yellow"]
BAD_PROTO = b"\xff\xfe this is not a tf.train.Example"


def png(index: int, side: int = 12) -> bytes:
  rng = np.random.default_rng(index)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def toy_record(i: int, origin: str = "toy") -> records.Record:
  return records.Record(image=png(i), text=f"a {COLOURS[i % 4]} thing number {i}",
                        id=f"{origin}-{i}", source=origin if i % 3 else f"{origin}:junk_image",
                        label=i % 4)


def write_dataset(data_dir: str, n: int, *, num_shards: int = 2, origin: str = "toy",
                  bad_proto=(), bad_image=(), vocab_size: int = 64) -> str:
  """Writes n records (bad ones at the given indices) and a tokenizer; returns data_dir."""
  os.makedirs(data_dir, exist_ok=True)
  blobs = []
  for i in range(n):
    if i in bad_proto:
      blobs.append(BAD_PROTO)
    elif i in bad_image:
      r = toy_record(i, origin)
      blobs.append(records.encode(records.Record(image=b"not an image", text=r.text,
                                                 id=r.id, source=r.source)))
    else:
      blobs.append(records.encode(toy_record(i, origin)))
  bounds = np.linspace(0, n, num_shards + 1).astype(int)
  shards = []
  for s in range(num_shards):
    name = f"{origin}-{s:05d}-of-{num_shards:05d}.array_record"
    path = os.path.join(data_dir, name)
    w = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for b in blobs[bounds[s]:bounds[s + 1]]:
      w.write(b)
    w.close()
    with open(path, "rb") as f:
      sha = hashlib.sha256(f.read()).hexdigest()
    shards.append({"file": name, "num_records": int(bounds[s + 1] - bounds[s]), "sha256": sha})
  sources = [origin, f"{origin}:junk_image"]
  counts = {src: sum(toy_record(i, origin).source == src for i in range(n)) for src in sources}
  manifest = {"name": origin, "num_examples": n, "shards": shards, "skipped": {},
              "sources": sources, "source_counts": counts, "class_names": COLOURS,
              "image_max_side": 12, "created_by": "tests/helpers_data.py"}
  with open(os.path.join(data_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  captions = [toy_record(i, origin).text for i in range(n)] + [
      f"a {c} {w}" for c in COLOURS for w in ("thing", "dog", "shape", "square")]
  tokenizer.train_tokenizer(captions, os.path.join(data_dir, "tokenizer"), vocab_size)
  return data_dir


def mem_kind(folder: str) -> sources.SourceKind:
  """The tests' "mem" source kind, registered with `monkeypatch.setitem(sources.KINDS,
  "mem", mem_kind(folder))`: "mem:N" is the first N records of `folder` held in memory,
  "mem:N:labelled" the same with the folder's class names. The root "mem" holds the sets
  `web` (all of it), `eval_labelled` and `eval_captions` (8 records each). Every
  function goes through the folder kind's public parts only, never its files."""
  folder_kind = sources.KINDS[sources.FOLDER]
  folder_manifest = folder_kind.manifest(folder)
  names = list(folder_manifest["sources"])

  def parse(spec):
    parts = spec.split(":")
    return int(parts[1]), parts[2:] == ["labelled"]

  def open_mem(spec):
    src, _ = folder_kind.open(folder)
    return [src[i] for i in range(parse(spec)[0])], list(names)

  def manifest(spec):
    out = {"sources": list(names)}
    if parse(spec)[1]:
      out["class_names"] = list(folder_manifest["class_names"])
    return out

  def sets(root):
    del root
    n = folder_manifest["num_examples"]
    return {"web": f"mem:{n}", "eval_labelled": "mem:8:labelled", "eval_captions": "mem:8"}

  return sources.SourceKind(
      open=open_mem, manifest=manifest, tokenizer=lambda spec: folder_kind.tokenizer(folder),
      fingerprint=lambda spec: {"num_examples": parse(spec)[0],
                                "of": folder_kind.fingerprint(folder)},
      captions=lambda spec: sources.read_captions(open_mem(spec)[0]), sets=sets)

"""The record format (README.md, "Record format"): one serialized `tf.train.Example` per record.

Features: `image` (bytes, encoded PNG/JPEG), `text` (bytes, UTF-8 caption), optional
`label` (int64), `id` (bytes, unique), `source` (bytes: which collection / damage kind).

The Example schema is declared here with protobuf itself rather than imported from
TensorFlow: importing TF costs ~7 s per process, and every Grain worker process would
pay it. The wire format is identical (tests/test_records.py checks against TF's parser).
"""

from __future__ import annotations

import dataclasses

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _build_example_class():
  f = descriptor_pb2.FileDescriptorProto(name="jest_pod_example.proto", package="tensorflow",
                                         syntax="proto3")
  T = descriptor_pb2.FieldDescriptorProto

  def msg(name, fields, oneof=None):
    m = f.message_type.add(name=name)
    if oneof:
      m.oneof_decl.add(name=oneof)
    for fname, number, ftype, label, type_name, packed in fields:
      fd = m.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        fd.type_name = type_name
      if packed:
        fd.options.packed = True
      if oneof:
        fd.oneof_index = 0
    return m

  rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
  msg("BytesList", [("value", 1, T.TYPE_BYTES, rep, None, False)])
  msg("FloatList", [("value", 1, T.TYPE_FLOAT, rep, None, True)])
  msg("Int64List", [("value", 1, T.TYPE_INT64, rep, None, True)])
  msg("Feature", [("bytes_list", 1, T.TYPE_MESSAGE, opt, ".tensorflow.BytesList", False),
                  ("float_list", 2, T.TYPE_MESSAGE, opt, ".tensorflow.FloatList", False),
                  ("int64_list", 3, T.TYPE_MESSAGE, opt, ".tensorflow.Int64List", False)],
      oneof="kind")
  features = msg("Features", [("feature", 1, T.TYPE_MESSAGE, rep,
                               ".tensorflow.Features.FeatureEntry", False)])
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, label=opt,
                  type_name=".tensorflow.Feature")
  msg("Example", [("features", 1, T.TYPE_MESSAGE, opt, ".tensorflow.Features", False)])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build_example_class()


@dataclasses.dataclass(frozen=True)
class Record:
  """One image-text example as stored on disk."""
  image: bytes          # encoded PNG or JPEG
  text: str             # caption
  id: str = ""
  source: str = ""
  label: int | None = None


def encode(record: Record) -> bytes:
  """Record -> serialized tf.train.Example bytes."""
  ex = Example()
  feat = ex.features.feature
  feat["image"].bytes_list.value.append(record.image)
  feat["text"].bytes_list.value.append(record.text.encode("utf-8"))
  if record.id:
    feat["id"].bytes_list.value.append(record.id.encode("utf-8"))
  if record.source:
    feat["source"].bytes_list.value.append(record.source.encode("utf-8"))
  if record.label is not None:
    feat["label"].int64_list.value.append(int(record.label))
  # deterministic: map fields (the feature names) in sorted order. Otherwise protobuf's
  # order depends on a per-process hash seed, and a rebuild of the same data writes other
  # shard bytes, which invalidates every reference cache fingerprinted on their sha256.
  return ex.SerializeToString(deterministic=True)


class RecordError(ValueError):
  """A record that cannot be parsed or lacks a required feature."""


def decode(data: bytes) -> Record:
  """Serialized tf.train.Example bytes -> Record. Raises RecordError on bad input."""
  ex = Example()
  try:
    ex.ParseFromString(data)
  except Exception as e:  # protobuf raises DecodeError; keep the message for the log
    raise RecordError(f"not a tf.train.Example: {e}") from e
  feat = ex.features.feature

  def one_bytes(key, required):
    if key not in feat or not feat[key].bytes_list.value:
      if required:
        raise RecordError(f"record lacks the required bytes feature {key!r}")
      return b""
    return feat[key].bytes_list.value[0]

  label = None
  if "label" in feat and feat["label"].int64_list.value:
    label = int(feat["label"].int64_list.value[0])
  return Record(image=one_bytes("image", True),
                text=one_bytes("text", True).decode("utf-8", errors="replace"),
                id=one_bytes("id", False).decode("utf-8", errors="replace"),
                source=one_bytes("source", False).decode("utf-8", errors="replace"),
                label=label)

"""Our hand-declared tf.train.Example (data/records.py) against TensorFlow's own: records we
write parse with TF's parser field for field, and Examples TF writes decode with ours."""

import pytest

from jest_pod.data import records

tf = pytest.importorskip("tensorflow")  # once per module: the import costs seconds

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))  # any bytes, NULs included
RECORDS = [
    records.Record(image=PNG, text="a red apple on a table", id="web-000001",
                   source="emoji", label=3),
    records.Record(image=b"\xff\xd8\xff\xe0jpeg", text="猫 🐱 café — naïve «ü»",
                   id="ß/δ/日本-7", source="openclipart:swapped_caption"),
    records.Record(image=b"x", text="", id="", source="", label=None),  # empty caption
    records.Record(image=PNG, text="big", id="18446744073709551615",  # 2^64 − 1 as an id
                   source="fashion_mnist", label=2**63 - 1),
    records.Record(image=PNG, text="negative label", id="9223372036854775807", label=-5),
]
SPEC = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "text": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "label": tf.io.VarLenFeature(tf.int64),
}


def _tf_example(r: records.Record) -> "tf.train.Example":
  """What TensorFlow's own classes make of a record (absent optional features left out,
  as `records.encode` does)."""
  feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.image])),
             "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.text.encode()]))}
  if r.id:
    feature["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[r.id.encode()]))
  if r.source:
    feature["source"] = tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[r.source.encode()]))
  if r.label is not None:
    feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[r.label]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


@pytest.mark.parametrize("r", RECORDS, ids=range(len(RECORDS)))
def test_our_records_parse_with_tensorflow(r):
  data = records.encode(r)
  parsed = tf.io.parse_single_example(data, SPEC)
  assert parsed["image"].numpy() == r.image
  assert parsed["text"].numpy().decode("utf-8") == r.text
  assert parsed["id"].numpy().decode("utf-8") == r.id
  assert parsed["source"].numpy().decode("utf-8") == r.source
  labels = tf.sparse.to_dense(parsed["label"]).numpy().tolist()
  assert labels == ([] if r.label is None else [r.label])
  # Proto level: the same message as TF's, feature for feature, and the same bytes.
  ex = tf.train.Example.FromString(data)
  assert set(ex.features.feature) == {k for k, v in (
      ("image", 1), ("text", 1), ("id", r.id), ("source", r.source),
      ("label", r.label is not None)) if v}
  assert ex == _tf_example(r)
  assert (ex.SerializeToString(deterministic=True)
          == _tf_example(r).SerializeToString(deterministic=True))


@pytest.mark.parametrize("r", RECORDS, ids=range(len(RECORDS)))
def test_tensorflow_examples_decode_with_ours(r):
  assert records.decode(_tf_example(r).SerializeToString()) == r


def test_tensorflow_example_with_extra_features_and_missing_ones():
  """Features we do not know (a float list, a second bytes value) are ignored; a missing
  required feature is a RecordError, never a crash."""
  ex = _tf_example(RECORDS[0])
  ex.features.feature["score"].float_list.value.extend([0.5, 1.5])
  ex.features.feature["text"].bytes_list.value.append(b"second caption, ignored")
  assert records.decode(ex.SerializeToString()) == RECORDS[0]
  del ex.features.feature["image"]
  with pytest.raises(records.RecordError, match="image"):
    records.decode(ex.SerializeToString())
  with pytest.raises(records.RecordError, match="not a tf.train.Example"):
    records.decode(b"\xff\xff\xff garbage")

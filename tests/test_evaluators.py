"""Evaluators: metric math on planted embeddings, sharded embedding, evaluator objects, CLI."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_pod import embed, evaluators
from jest_pod.evaluators import metrics


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


# ------------------------------------------------------------------------------- math


def test_zeroshot_accuracy_hand_computed():
  class_emb = np.eye(3)
  image_emb = np.array([[1, .5, 0],     # label 0: rank 0
                        [1, .5, 0],     # label 1: rank 1
                        [0, .2, 1],     # label 2: rank 0
                        [.1, .2, 1]])   # label 0: rank 2
  acc = metrics.zeroshot_accuracy(image_emb, class_emb, np.array([0, 1, 2, 0]), ks=(1, 2, 5))
  assert acc == {"top1": 0.5, "top2": 0.75, "top5": 1.0}  # k > C: every image correct


def test_class_embeddings_normalise_each_prompt_then_the_mean():
  prompts = np.array([[[2., 0.], [0., 1.]],      # class 0: unequal norms, equal weight
                      [[0., 3.], [0., 5.]]])
  np.testing.assert_allclose(metrics.class_embeddings(prompts),
                             [[2 ** -.5, 2 ** -.5], [0, 1]], rtol=1e-6)


def test_retrieval_recall_hand_computed_several_captions_per_image():
  img = np.eye(3)
  txt = np.array([[.2, 1, 0],   # caption of image 0; image 1 scores higher → rank 1
                  [1, 0, 0],    # image 0, rank 0
                  [0, .1, 1],   # image 1: scores .1 with it, image 2 higher → rank 1
                  [0, .5, 1]])  # image 2, rank 0
  c2i = np.array([0, 0, 1, 2])
  got = metrics.retrieval_recall(img, txt, c2i, ks=(1, 2, 5), block=2)
  # img2txt: image 0 best own caption rank 0; image 1 rank 2 (captions 0, 3 above);
  # image 2 rank 1 (caption 2 above).
  assert got["img2txt_recall@1"] == pytest.approx(1 / 3)
  assert got["img2txt_recall@2"] == pytest.approx(2 / 3)
  assert got["img2txt_recall@5"] == 1.0
  assert got["txt2img_recall@1"] == 0.5
  assert got["txt2img_recall@2"] == 1.0


def test_ties_rank_the_correct_item_below_the_others():
  """Pessimistic ranks: a tie never counts as a hit, so equal embeddings (all-zero weights)
  score 0, not 100% (issue 32)."""
  zero = np.zeros((6, 4))
  acc = metrics.zeroshot_accuracy(zero, np.zeros((10, 4)), np.arange(6), ks=(1, 5, 11))
  assert acc == {"top1": 0.0, "top5": 0.0, "top11": 1.0}  # k > C: still every image
  same = np.ones((6, 4))
  assert metrics.zeroshot_accuracy(same, np.ones((10, 4)), np.arange(6), ks=(1,)) == {"top1": 0}
  rec = metrics.retrieval_recall(same, same, ks=(1, 5, 6))
  assert rec == {"img2txt_recall@1": 0.0, "txt2img_recall@1": 0.0, "img2txt_recall@5": 0.0,
                 "txt2img_recall@5": 0.0, "img2txt_recall@6": 1.0, "txt2img_recall@6": 1.0}
  # A caption tying between its image and another (cosine 0 with both) ranks below both.
  img = np.eye(3)
  got = metrics.retrieval_recall(img, np.array([[0., 0, 1], [1, 0, 0], [0, .5, 1]]),
                                 np.array([1, 0, 2]), ks=(1, 2, 3), block=2)
  assert (got["txt2img_recall@1"], got["txt2img_recall@2"], got["txt2img_recall@3"]) == (
      pytest.approx(2 / 3), pytest.approx(2 / 3), 1.0)
  # Copies of the correct item do not count against it: identical captions of one image.
  dup = metrics.retrieval_recall(img, np.array([[1., 0, 0], [1, 0, 0]]), np.array([0, 0]),
                                 ks=(1,))
  assert dup == {"img2txt_recall@1": 1.0, "txt2img_recall@1": 1.0}


def test_non_finite_embeddings_are_an_error_not_a_score():
  x = np.eye(3)
  for bad in (np.nan, np.inf):
    y = x.copy()
    y[1, 2] = bad
    with pytest.raises(metrics.NonFiniteEmbeddings, match="zero-shot: 1 of 3 image embeddings"):
      metrics.zeroshot_accuracy(y, x, np.arange(3))
    with pytest.raises(metrics.NonFiniteEmbeddings, match="class_text embeddings"):
      metrics.zeroshot_accuracy(x, y, np.arange(3))
    with pytest.raises(metrics.NonFiniteEmbeddings, match="retrieval: 1 of 3 text"):
      metrics.retrieval_recall(x, y)
  assert issubclass(metrics.NonFiniteEmbeddings, evaluators.EvalDataError)  # eval CLI: 1 line


def test_retrieval_identity_and_uncaptioned_images():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8))
  perfect = metrics.retrieval_recall(x, x, ks=(1,))
  assert perfect == {"img2txt_recall@1": 1.0, "txt2img_recall@1": 1.0}
  # Image 5 has no caption: it is left out of img2txt instead of counting as a miss.
  got = metrics.retrieval_recall(x, x[:5], np.arange(5), ks=(1,))
  assert got["img2txt_recall@1"] == 1.0
  with pytest.raises(ValueError, match="caption_to_image"):
    metrics.retrieval_recall(x, x[:5])


def test_group_identical():
  first, group = metrics.group_identical([b"a", b"b", b"a", b"c", b"b"])
  assert first.tolist() == [0, 1, 3] and group.tolist() == [0, 1, 0, 2, 1]


# --------------------------------------------------------------- embedding on the mesh


def _projection_encode(params, batch):
  x = batch["image"].reshape(batch["image"].shape[0], -1)
  return {"image": x @ params["w"]}


@pytest.mark.parametrize("batch_size", [4, 16])
def test_embed_batches_masks_padding_and_matches_across_device_counts(batch_size):
  rng = np.random.default_rng(1)
  n = 13  # divides neither batch size nor device count
  images = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
  labels = np.arange(n, dtype=np.int32)
  params = {"w": rng.normal(size=(48, 5)).astype(np.float32)}
  want = images.reshape(n, -1) @ params["w"]
  got = {}
  for n_dev in (1, 8):
    got[n_dev] = embed.embed_batches(
        _projection_encode, params,
        embed.array_batches({"image": images, "label": labels}, batch_size), _mesh(n_dev),
        device_keys=("image",), host_keys=("label",))
    assert got[n_dev]["image"].shape == (n, 5)
    assert got[n_dev]["label"].tolist() == list(range(n))  # each row exactly once, in order
    np.testing.assert_allclose(got[n_dev]["image"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1]["image"], got[8]["image"], rtol=1e-6, atol=1e-6)


def test_embed_batches_keeps_int64_indices_past_2_31():
  # Record indices of a 2^33-record pool: order and values survive the device round trip.
  rng = np.random.default_rng(2)
  images = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
  index = np.array([2**33 + 5, 3, 2**31, 2**33 + 1, 2**32 - 1, 7], np.int64)
  batches = [{"image": images[s:s + 3], "index": index[s:s + 3], "mask": np.ones(3, np.float32)}
             for s in (0, 3)]
  got = embed.embed_batches(_projection_encode, {"w": np.ones((48, 2), np.float32)}, batches,
                            _mesh(1), device_keys=("image",), host_keys=("index",))
  assert got["index"].dtype == np.int64
  assert got["index"].tolist() == sorted(index.tolist())
  want = images.reshape(6, -1).sum(1)[np.argsort(index)]
  np.testing.assert_allclose(got["image"][:, 0], want, rtol=1e-5, atol=1e-5)


def test_array_batches_pads_last_batch():
  bs = list(embed.array_batches({"x": np.arange(5)}, 2))
  assert [b["mask"].tolist() for b in bs] == [[1, 1], [1, 1], [1, 0]]
  assert bs[-1]["x"].tolist() == [4, 0]


# ------------------------------------------------------------ evaluator objects (fake model)


class FakeTwoTower(nn.Module):
  """Apply contract of TwoTower: an image's embedding is its mean colour; a caption's is
  the one-hot of its first token − 1. Colour c ↔ token c + 1 makes matches planted."""

  @nn.compact
  def __call__(self, image, text, patch_size=None):
    scale = self.param("scale", nn.initializers.ones, ())
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    zimg = None if image is None else norm(scale * image.mean(axis=(1, 2)) + 1e-3)
    ztxt = None if text is None else norm(jax.nn.one_hot(text[:, 0] - 1, 3) + 1e-3)
    return zimg, ztxt, {"t": 10.0, "b": -10.0}


CLASSES = ["red", "green", "blue"]


def _fake_tokenize(texts):
  return np.array([[1 + next(i for i, c in enumerate(CLASSES) if c in t), 7]
                   for t in texts], np.int32)


def _fake_set(tmp_path, colours, captions, labels, class_names=CLASSES):
  """A data set folder (manifest only) and the host arrays its eval iterator yields."""
  d = tmp_path / "fakeset"
  d.mkdir(exist_ok=True)
  n = len(colours)  # a valid manifest; its shard is never read (injected iterator)
  manifest = {"name": "fake", "num_examples": n, "skipped": {}, "sources": ["fake"],
              "source_counts": {"fake": n}, "image_max_side": 4, "created_by": "test",
              "shards": [{"file": "fake-00000-of-00001.array_record", "num_records": n,
                          "sha256": ""}]}
  if class_names is not None:
    manifest["class_names"] = class_names
  (d / "manifest.json").write_text(json.dumps(manifest))
  images = np.zeros((len(colours), 4, 4, 3), np.float32)
  images[np.arange(len(colours)), :, :, colours] = 1.0
  arrays = {"image": images, "text": np.asarray(captions, np.int32),
            "label": np.asarray(labels, np.int32)}
  return str(d), arrays


def _config(data_dir):
  return {"input": {"image_size": 4, "max_text_len": 2},
          "evals": {"fake_0shot": {"type": "zeroshot", "data": data_dir, "every_steps": 10,
                                   "batch_size": 3},
                    "fake_retr": {"type": "retrieval", "data": data_dir, "every_steps": 20,
                                  "batch_size": 3}}}


def _build(config, arrays, mesh, **kw):
  model = FakeTwoTower()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.ones((1, 2), jnp.int32))
  evs = [evaluators.build_evaluator(
      name, ecfg, config, model, mesh,
      iterator_fn=lambda: embed.array_batches(arrays, 3), **kw)
      for name, ecfg in config["evals"].items()]
  return evs, params["params"]


def test_evaluators_planted_metrics_same_on_1_and_8_devices(tmp_path):
  colours = [0, 1, 2, 0, 1, 2, 0]          # 7 records; batch 3 → last batch padded
  labels = [0, 1, 2, 0, 2, 2, 1]           # two wrong labels → top1 = 5/7
  # Captions (token = colour + 1); record 6's caption says "blue" for a red image.
  captions = [[1, 7], [2, 7], [3, 7], [1, 7], [2, 7], [3, 7], [3, 7]]
  data_dir, arrays = _fake_set(tmp_path, colours, captions, labels)
  results = {}
  for n in (1, 8):
    evs, params = _build(_config(data_dir), arrays, _mesh(n), tokenize_fn=_fake_tokenize)
    assert [e.every_steps for e in evs] == [10, 20]
    results[n] = {k: v for e in evs for k, v in e.run(params).items()}
  assert results[1] == results[8]
  r = results[8]
  assert r["z/0shot/fake_top1"] == pytest.approx(5 / 7)
  assert r["z/0shot/fake_top5"] == 1.0
  # Identical pixels group into 3 images with 7 captions; caption 6 ("blue") points at red,
  # but the blue image carries the same caption: a hit once identical captions group
  # (6/7 without: tests/test_eval_cli.py).
  assert r["z/retr/fake_txt2img_recall@1"] == 1.0
  assert r["z/retr/fake_img2txt_recall@1"] == 1.0
  assert set(r) >= {f"z/retr/fake_{d}_recall@{k}" for d in ("img2txt", "txt2img")
                    for k in (1, 5, 10)}


def test_evaluators_refuse_nan_params_and_give_zero_params_no_credit(tmp_path):
  """issue 32: NaN image weights and all-zero weights scored 100% zero-shot and recall."""
  colours, labels = [0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2, 0]
  captions = [[c + 1, 7] for c in colours]
  data_dir, arrays = _fake_set(tmp_path, colours, captions, labels)
  evs, params = _build(_config(data_dir), arrays, _mesh(1), tokenize_fn=_fake_tokenize)
  good = {k: v for e in evs for k, v in e.run(params).items()}
  assert good["z/0shot/fake_top1"] == 1.0 and good["z/retr/fake_txt2img_recall@1"] == 1.0
  # scale 0: every image embeds to the same vector, equally close to every class and caption.
  zero = {k: v for e in evs for k, v in e.run({"scale": jnp.zeros(())}).items()}
  assert zero["z/0shot/fake_top1"] == 0.0 and zero["z/0shot/fake_top5"] == 1.0  # k > C
  assert zero["z/retr/fake_txt2img_recall@1"] == 0.0
  for ev in evs:
    with pytest.raises(evaluators.NonFiniteEmbeddings, match=r"on 'fake' \(.*fakeset\): 7 of 7 "
                       r"image embeddings are NaN or infinite"):
      ev.run({"scale": jnp.full((), jnp.nan)})


def test_zeroshot_without_class_names_is_a_clear_error(tmp_path):
  data_dir, arrays = _fake_set(tmp_path, [0, 1], [[1, 7], [2, 7]], [-1, -1], class_names=None)
  config = _config(data_dir)
  with pytest.raises(evaluators.EvalDataError, match=r"'fake'.*class_names"):
    _build(config, arrays, _mesh(1), tokenize_fn=_fake_tokenize)


def test_zeroshot_without_labels_is_a_clear_error(tmp_path):
  data_dir, arrays = _fake_set(tmp_path, [0, 1], [[1, 7], [2, 7]], [-1, -1])
  config = _config(data_dir)
  del config["evals"]["fake_retr"]
  (ev,), params = _build(config, arrays, _mesh(1), tokenize_fn=_fake_tokenize)
  with pytest.raises(evaluators.EvalDataError, match="no record has a label"):
    ev.run(params)


def test_build_evaluators_rejects_unknown_type(tmp_path):
  with pytest.raises(ValueError, match="evals.x.type"):
    evaluators.build_evaluators({"evals": {"x": {"type": "knn", "data": str(tmp_path)}}},
                                None, _mesh(1))
  assert evaluators.build_evaluators({}, None, _mesh(1)) == []


# ----------------------------------------- real model, real records, checkpoint, tools/eval

import subprocess  # noqa: E402
import sys  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A toy data set, a tiny TwoTower saved with jest_pod.checkpoint on an 8-device mesh,
  and the metrics the evaluators give on those 8 devices in this process."""
  import grain
  from helpers_data import write_dataset
  from jest_pod import checkpoint, config as config_lib
  from jest_pod.models import build_model

  root = tmp_path_factory.mktemp("evalrun")
  data_dir = write_dataset(str(root / "toy"), 11, num_shards=2)  # 11: not a batch multiple
  c = config_lib.base_config()
  c.input.data = data_dir
  c.input.image_size, c.input.max_text_len = 8, 8
  c.model.image_size = 8
  c.model.embed_dim = 16
  c.model.image = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
  c.model.text = dict(vocab_size=64, max_len=8, width=16, depth=1, num_heads=2, mlp_dim=32)
  c.evals = {"toy_zeroshot": {"type": "zeroshot", "data": data_dir, "batch_size": 4},
             "toy_retrieval": {"type": "retrieval", "data": data_dir, "batch_size": 4}}
  model = build_model(c.model)
  mesh = _mesh(8)
  # Random params of the right shapes: compiling model.init would cost ~15 s on 2 cores.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
  params = jax.device_put(params,
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  workdir = root / "work"
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=2, async_save=False)
  ckpt.save(3, {"params": params, "step": jnp.int32(3)},
            iter(grain.MapDataset.range(4).to_iter_dataset()), c, force=True)
  ckpt.close()
  metrics, arrays = {}, {}
  for ev in evaluators.build_evaluators(c, model, mesh):
    m, a = ev.evaluate(params)
    metrics.update(m)
    arrays.update({f"{ev.name}/{k}": v for k, v in a.items()})
  return {"workdir": str(workdir), "data": data_dir, "metrics": metrics, "arrays": arrays,
          "model": model, "config": c, "params": params}


def test_checkpoint_saved_on_8_devices_evaluates_the_same_on_1(saved_run, tmp_path):
  out, emb = tmp_path / "results.json", tmp_path / "emb.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "eval"), saved_run["workdir"],
       "--data", f"zeroshot:{saved_run['data']}", "--data", f"retrieval:{saved_run['data']}",
       "--batch-size", "5", "--output", str(out),
       "--embeddings", str(emb)], env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 1 cpu device" in proc.stdout and "z/0shot/toy_top1" in proc.stdout
  result = json.loads(out.read_text())
  assert result["step"] == 3 and result["devices"] == 1
  got, want = result["metrics"], saved_run["metrics"]
  assert set(got) == set(want) and len(want) == 2 + 6
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-9), k
  saved = np.load(emb)
  assert saved["toy_zeroshot/image"].shape == (11, 16)
  np.testing.assert_allclose(saved["toy_zeroshot/image"], saved_run["arrays"]["toy_zeroshot/image"],
                             atol=1e-5)
  np.testing.assert_allclose(saved["toy_retrieval/text"], saved_run["arrays"]["toy_retrieval/text"],
                             atol=1e-5)


def test_eval_cli_clear_errors(saved_run, tmp_path, capsys):
  from jest_pod.evaluators import cli
  assert cli.main([str(tmp_path / "nowhere")]) == 1
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  assert cli.main([str(tmp_path / "empty")]) == 1
  assert "no complete checkpoint" in capsys.readouterr().err
  assert cli.main([saved_run["workdir"], "--step", "99"]) == 1
  assert "available: [3]" in capsys.readouterr().err
  assert cli.main([saved_run["workdir"], "--data", f"zeroshot:{tmp_path}"]) == 1
  assert "no manifest.json" in capsys.readouterr().err


def test_incompatible_params_are_named(saved_run):
  from jest_pod.checkpoint import CheckpointError, check_params_fit
  from jest_pod.evaluators import input_sizes
  from jest_pod.models import build_model
  c = saved_run["config"].copy_and_resolve_references()
  c.model.embed_dim = 32
  with pytest.raises(CheckpointError, match=r"(?s)do not fit.*head"):
    check_params_fit(build_model(c.model), saved_run["params"], *input_sizes(c))
  check_params_fit(saved_run["model"], saved_run["params"], *input_sizes(saved_run["config"]))

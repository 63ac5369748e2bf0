"""`jest-pod eval` and the evaluators as a newcomer meets them: the metric table's order,
which evaluators a plain `--data DIR` picks, identical captions, interrupting an
evaluation, and quiet checkpoint loads."""

import json
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_pod import evaluators
from jest_pod import embed
from jest_pod.evaluators import base, metrics
from jest_pod.evaluators import cli as eval_cli


# ------------------------------------------------------------------------- eval table


def test_metric_table_orders_k_numerically():
  names = ["z/retr/b_txt2img_recall@10", "z/retr/b_txt2img_recall@5", "z/retr/b_img2txt_recall@1",
           "z/retr/b_img2txt_recall@10", "z/0shot/a_top5", "z/0shot/a_top1",
           "z/retr/b_img2txt_recall@5", "z/retr/b_txt2img_recall@1"]
  table = eval_cli.format_table({n: 0.5 for n in names})
  got = [line.split()[0] for line in table.splitlines()[2:]]
  assert got == ["z/0shot/a_top1", "z/0shot/a_top5",
                 "z/retr/b_img2txt_recall@1", "z/retr/b_img2txt_recall@5",
                 "z/retr/b_img2txt_recall@10", "z/retr/b_txt2img_recall@1",
                 "z/retr/b_txt2img_recall@5", "z/retr/b_txt2img_recall@10"]


# ------------------------------------------------------------- which evaluators run


def _set(tmp_path, name, class_names=None):
  d = tmp_path / name
  d.mkdir()
  manifest = {"name": name, "num_examples": 1, "skipped": {}, "sources": ["x"],
              "source_counts": {"x": 1}, "image_max_side": 4, "created_by": "test",
              "shards": [{"file": "x.array_record", "num_records": 1, "sha256": ""}]}
  if class_names:
    manifest["class_names"] = class_names
  (d / "manifest.json").write_text(json.dumps(manifest))
  return str(d)


def test_plain_data_on_a_labelled_set_skips_retrieval(tmp_path):
  labelled, captions = _set(tmp_path, "lab", ["cat", "dog"]), _set(tmp_path, "cap")
  args = types.SimpleNamespace(batch_size=8, tokenizer=None, patch_size=None,
                               class_names=None, templates=None)
  specs = eval_cli.eval_specs([labelled, captions], args)
  assert {k: v["type"] for k, v in specs.items()} == {"lab_zeroshot": "zeroshot",
                                                      "cap_retrieval": "retrieval"}
  # Asked for explicitly, it runs.
  specs = eval_cli.eval_specs([labelled, f"retrieval:{labelled}"], args)
  assert sorted(specs) == ["lab_retrieval", "lab_zeroshot"]


def test_partial_manifest_is_a_clear_error_with_a_fix_that_applies(tmp_path):
  from helpers_data import write_dataset
  d = write_dataset(str(tmp_path / "foreign"), 4, num_shards=2)
  manifest = json.loads(open(os.path.join(d, "manifest.json")).read())
  os.remove(os.path.join(d, manifest["shards"][1]["file"]))
  with pytest.raises(evaluators.EvalDataError) as e:
    base.check_data_set(d)
  msg = str(e.value)
  assert d in msg and "is missing" in msg and "--overwrite" not in msg
  assert f"jest-pod data verify {d}" in msg and "jest-pod data ingest --input SRC" in msg
  del manifest["shards"]
  with open(os.path.join(d, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(evaluators.EvalDataError, match=r"lacks fields \['shards'\]\. `jest-pod"):
    base.check_data_set(d)


# ----------------------------------------------------------------- identical captions


def test_identical_captions_count_as_one_text():
  img = np.eye(2)
  # Captions 0 and 1 are the same text (group 0; embeddings differ slightly, as they may
  # across batches), one per image; caption 2 is image 1's too.
  txt = np.array([[1., .2], [1., .1], [0., 1.]])
  c2i = np.array([0, 1, 1])
  plain = metrics.retrieval_recall(img, txt, c2i, ks=(1,))
  grouped = metrics.retrieval_recall(img, txt, c2i, ks=(1,), caption_groups=np.array([0, 0, 1]))
  # txt2img: caption 1 retrieves image 0 first; image 0 carries the same text → a hit.
  assert plain["txt2img_recall@1"] == pytest.approx(2 / 3)
  assert grouped["txt2img_recall@1"] == 1.0
  # img2txt: image 0's top caption is caption 1 (cos .995 > .98), a copy of its own text.
  assert plain["img2txt_recall@1"] == 0.5
  assert grouped["img2txt_recall@1"] == 1.0
  # Group ids are labels only, and blocking does not change the result.
  assert metrics.retrieval_recall(img, txt, c2i, ks=(1,), block=1,
                                 caption_groups=np.array([7, 7, 3])) == grouped


def test_retrieval_evaluator_groups_identical_captions(tmp_path):
  from test_evaluators import FakeTwoTower, _fake_set, _mesh
  colours = [0, 1, 2, 0]
  captions = [[1, 7], [2, 7], [3, 7], [3, 7]]  # record 3: "blue" on a red image
  data_dir, arrays = _fake_set(tmp_path, colours, captions, [0, 1, 2, 0])
  model = FakeTwoTower()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.ones((1, 2), jnp.int32))
  got = {}
  for grouped in (False, True):
    ev = evaluators.RetrievalEvaluator(
        "r", data_dir, model, _mesh(2), group_identical_captions=grouped,
        iterator_fn=lambda: embed.array_batches(arrays, 3))
    got[grouped] = ev.run(params["params"])["z/retr/fake_txt2img_recall@1"]
  assert got == {False: 0.75, True: 1.0}


# ------------------------------------------------------------------ interrupting eval


def test_should_stop_interrupts_between_batches(tmp_path):
  from test_evaluators import FakeTwoTower, _fake_set, _mesh
  data_dir, arrays = _fake_set(tmp_path, [0, 1, 2, 0, 1], [[1, 7], [2, 7], [3, 7], [1, 7],
                                                           [2, 7]], [0, 1, 2, 0, 1])
  model = FakeTwoTower()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.ones((1, 2), jnp.int32))
  ev = evaluators.RetrievalEvaluator("r", data_dir, model, _mesh(1),
                                     iterator_fn=lambda: embed.array_batches(arrays, 2))
  calls = []

  def stop_after_one_call():
    calls.append(1)
    return len(calls) > 1

  with pytest.raises(evaluators.EvalInterrupted):
    ev.run(params["params"], should_stop=stop_after_one_call)
  assert len(calls) == 2  # one batch embedded, stopped before the second
  assert ev.run(params["params"], should_stop=None) == ev.run(params["params"])
  assert ev.run(params["params"], should_stop=lambda: False) == ev.run(params["params"])


# ------------------------------------------------------------------- quiet restore


def test_load_params_logs_no_absl_warning(tmp_path, caplog):
  import grain
  import ml_collections
  from jest_pod import checkpoint
  state = {"params": {"w": jnp.arange(4.0)}, "step": jnp.int32(1)}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False)
  ckpt.save(1, state, iter(grain.MapDataset.range(2).to_iter_dataset()),
            ml_collections.ConfigDict({"seed": 0}), force=True)
  ckpt.close()
  with caplog.at_level(logging.INFO, logger="absl"):
    caplog.clear()
    config, params, step = checkpoint.load_params(tmp_path)
  warnings = [r.getMessage() for r in caplog.records
              if r.name == "absl" and r.levelno >= logging.WARNING]
  assert warnings == []
  assert step == 1 and config.seed == 0
  np.testing.assert_array_equal(params["w"], np.arange(4.0))
  # Real errors still surface.
  os.remove(tmp_path / "checkpoints" / "1" / "state" / "_METADATA")
  with pytest.raises(checkpoint.CheckpointError, match="could not read the state"):
    checkpoint.load_params(tmp_path)

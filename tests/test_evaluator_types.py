"""The evaluator registry (`evaluators.base.TYPES`): type inference, eval-set discovery
through the source kind, metric names and headlines, and a new type added the way
WORKSPACE_NOTES "Extending" says (its module + one `TYPES` entry)."""

import argparse
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_pod import config as config_lib
from jest_pod.data import sources
from jest_pod.evaluators import base
from jest_pod.evaluators import cli as eval_cli
from jest_pod.experiments import sweep_report
from tests import helpers_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return helpers_data.write_dataset(str(tmp_path_factory.mktemp("data")), 12)


@pytest.fixture
def mem(folder, monkeypatch):
  monkeypatch.setitem(sources.KINDS, "mem", helpers_data.mem_kind(folder))


class MeanColour(nn.Module):
  """A model with the TwoTower apply contract and no weights worth training: an image is
  its mean colour, a caption the one-hot of its first token mod 3."""

  @nn.compact
  def __call__(self, image, text, patch_size=None):
    scale = self.param("scale", nn.initializers.ones, ())
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    zimg = None if image is None else norm(scale * image.mean(axis=(1, 2)) + 2.0)
    ztxt = None if text is None else norm(jax.nn.one_hot(text[:, 0] % 3, 3) + 1e-3)
    return zimg, ztxt, {"t": 10.0, "b": -10.0}


def _mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


def _run_config(folder):
  return {"input": {"image_size": 8, "max_text_len": 6,
                    "tokenizer": sources.tokenizer_path(folder)}}


def test_inference_has_one_home():
  assert base.infer_type({"class_names": ["a"]}) == "zeroshot"
  assert base.infer_type({}) == base.DEFAULT_TYPE == "retrieval"
  assert base.infer_type({}, {"class_names": "names.txt"}) == "zeroshot"  # --class-names


def test_metric_names_and_headlines_come_from_the_classes():
  zs, rt = base.evaluator_class("zeroshot"), base.evaluator_class("retrieval")
  assert zs.metric_keys("s") == ["z/0shot/s_top1", "z/0shot/s_top5"]
  assert rt.headline("s") == ("s R@5", ("z/retr/s_img2txt_recall@5",
                                        "z/retr/s_txt2img_recall@5"))
  keys = zs.metric_keys("eval_a_b") + rt.metric_keys("w") + ["z/retr/x_img2txt_recall@5"]
  assert base.headlines(keys) == {"eval_a_b top-1": ("z/0shot/eval_a_b_top1",),
                                  "w R@5": rt.headline("w")[1]}
  assert base.logged_keys(keys, "retrieval", "img2txt_recall@1") == ["z/retr/w_img2txt_recall@1"]
  with pytest.raises(ValueError, match="not 'top3'"):
    base.logged_keys(keys, "zeroshot", "top3")


def test_eval_sets_are_discovered_through_the_source_kind_and_run(folder, mem):
  # The "mem" root lists its sets; their manifests (class names or not) give the types.
  found = base.discover("mem")
  assert found == {"eval_captions": {"type": "retrieval", "data": "mem:8"},
                   "eval_labelled": {"type": "zeroshot", "data": "mem:8:labelled"}}
  assert config_lib.eval_sets("mem") == {"eval_captions": "retrieval",
                                         "eval_labelled": "zeroshot"}
  model = MeanColour()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                      jnp.ones((1, 6), jnp.int32))["params"]
  config = {**_run_config(folder),
            "evals": {name: {**spec, "batch_size": 4, "set_name": name}
                      for name, spec in found.items()}}
  metrics = {}
  for ev in base.build_evaluators(config, model, _mesh()):
    metrics.update(ev.run(params))  # records read and decoded from the mem source
  assert set(metrics) == set(base.evaluator_class("retrieval").metric_keys("eval_captions")
                             + base.evaluator_class("zeroshot").metric_keys("eval_labelled"))
  assert all(0 <= v <= 1 for v in metrics.values())
  assert set(sweep_report.metric_keys([metrics])) == {"eval_captions R@5", "eval_labelled top-1"}


COUNT_MODULE = '''
"""A new evaluator type, as WORKSPACE_NOTES "Extending" describes it."""
import numpy as np

from jest_pod.evaluators import base


class RecordCountEvaluator(base.Evaluator):
  CONFIG_KEYS = ("scale",)
  KEY_PREFIX = "z/count/"
  METRICS = ("records", "captioned")
  HEADLINE, HEADLINE_LABEL = ("records",), "{set} records"

  @classmethod
  def claims(cls, manifest, given):
    return bool(manifest.get("count_me"))

  def __init__(self, name, data_dir, model, mesh, *, scale=1.0, **kwargs):
    super().__init__(name, data_dir, model, mesh, **kwargs)
    self.scale = float(scale)

  def evaluate(self, params, should_stop=None):
    n = captioned = 0
    for b in self.batches():
      real = np.asarray(b["mask"]) > 0
      n += int(real.sum())
      captioned += int(((np.asarray(b["text"]) != 0).any(axis=1) & real).sum())
    return {self.metric_key(self.set_name, "records"): self.scale * n,
            self.metric_key(self.set_name, "captioned"): captioned / max(n, 1)}, {}
'''


def test_a_new_evaluator_type_is_its_module_and_one_registry_entry(folder, mem, tmp_path,
                                                                    monkeypatch):
  (tmp_path / "count_eval.py").write_text(textwrap.dedent(COUNT_MODULE))
  monkeypatch.syspath_prepend(str(tmp_path))
  c = config_lib.base_config()
  c.input.data = "mem:12"
  c.evals = {"n": {"type": "count", "data": "mem:9", "batch_size": 4, "scale": 2.0,
                   "set_name": "nine"}}
  with pytest.raises(ValueError, match="evals.n.type='count' is not valid"):
    config_lib.validate(c)  # not registered yet
  monkeypatch.setitem(base.TYPES, "count", "count_eval:RecordCountEvaluator")
  config_lib.validate(c)  # validated
  ev = base.build_evaluator("n", c.evals.n, _run_config(folder), None, _mesh())  # built
  assert type(ev).__name__ == "RecordCountEvaluator" and ev.scale == 2.0
  metrics = ev.run(None)
  assert metrics == {"z/count/nine_records": 18.0, "z/count/nine_captioned": 1.0}
  # The reports find its headline beside the built-in types' ...
  events = [{"step": 1, "examples": 10, **metrics, "z/0shot/eval_x_top1": 0.5}]
  assert sweep_report.metric_keys(events) == {"eval_x top-1": ("z/0shot/eval_x_top1",),
                                              "nine records": ("z/count/nine_records",)}
  assert base.logged_keys(metrics, "count", "captioned") == ["z/count/nine_captioned"]
  # ... inference and `jest-pod eval --data TYPE:SPEC` know it.
  assert base.infer_type({"count_me": True}) == "count"
  args = argparse.Namespace(batch_size=4, tokenizer=None, patch_size=None, class_names=None,
                            templates=None, scale=3.0)
  specs = eval_cli.eval_specs(["count:mem:9", "mem:8:labelled"], args)
  assert specs["mem:9_count"] == {"type": "count", "data": "mem:9", "batch_size": 4,
                                  "scale": 3.0}
  assert specs["mem:8:labelled_zeroshot"]["type"] == "zeroshot"

"""Flexi patch defaults follow the model's patch (a ViT-B/16 config that forgets
`flexi.train_patch_sizes` must not train at patch 4), resolved in one place."""

import inspect
import os

import jax.numpy as jnp
import pytest

from jest_pod import config as config_lib
from jest_pod.jest import step as jest_lib
from jest_pod.train import flops as flops_lib
from jest_pod.train import state as state_lib
from jest_pod.train import step as step_lib


def _b16_forgetting_flexi():
  c = config_lib.base_config()
  c.input.image_size = c.model.image_size = 224
  c.model.image = dict(patch_size=16, width=64, depth=1, num_heads=2, mlp_dim=128)
  return c


def test_defaults_resolve_to_the_model_patch():
  c = _b16_forgetting_flexi()
  assert tuple(c.flexi.train_patch_sizes) == () and c.flexi.score_patch_size == 0
  assert config_lib.resolve(c).train_patches == (16,)
  assert config_lib.resolve(c).score_patch == 16
  config_lib.validate(c)
  # The one resolver: the JEST step takes the run spec's patch (jest does not import
  # config), the FLOP model and the train step read the run spec, and no module keeps a
  # copy of its own.
  assert config_lib.resolve(c).score_patch == 16
  assert "score_patch" in inspect.signature(jest_lib.JestStep).parameters
  assert not hasattr(jest_lib, "score_patch_size")
  explicit = _b16_forgetting_flexi()
  explicit.flexi.train_patch_sizes = (16,)
  assert flops_lib.step_flops(c) == flops_lib.step_flops(explicit)


def test_explicit_values_win():
  c = _b16_forgetting_flexi()
  c.flexi.update(score_patch_size=32, train_patch_sizes=(16, 32), train_fractions=(0.5, 0.5))
  assert config_lib.resolve(c).train_patches == (16, 32)
  assert config_lib.resolve(c).score_patch == 32
  c.flexi.train_fractions = (1.0,)  # still checked against the resolved sizes
  with pytest.raises(ValueError, match="train_fractions"):
    config_lib.validate(c)


def test_train_step_encodes_images_at_the_resolved_patch():
  c = _b16_forgetting_flexi()

  class Recorder:  # a stand-in two-tower that records the patch of each image call

    def __init__(self):
      self.patches = []

    def apply(self, variables, image, text, patch_size=None):
      w = variables["params"]["w"]
      if image is not None:
        self.patches.append(patch_size)
      zi = None if image is None else jnp.ones((image.shape[0], 4)) * w
      zt = None if text is None else jnp.ones((text.shape[0], 4)) * w
      return zi, zt, {"t": jnp.float32(10.0), "b": jnp.float32(-10.0)}

  model = Recorder()
  tx, schedule = state_lib.make_optimizer(c.optax, c.total_steps)
  params = {"w": jnp.ones((4,))}
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  batch = {"image": jnp.zeros((4, 224, 224, 3)), "text": jnp.zeros((4, 16), jnp.int32)}
  step_lib.make_train_step(c, model, tx, schedule)(state, batch)
  assert model.patches == [16]


@pytest.mark.parametrize("name, arg, score, train", [
    ("siglip.py", "runlocal", 4, (4,)),
    ("siglip.py", "", 4, (4,)),
    ("reference.py", "runlocal", 4, (4,)),
    ("jest.py", "runlocal", 8, (4, 8)),
    ("jest.py", "runlocal,flexi=0", 4, (4,)),
    ("pod_vit_b16.py", "", 32, (16, 32)),
    ("pod_vit_b16.py", "runlocal", 32, (16, 32)),
])
def test_shipped_configs_resolve_as_before(name, arg, score, train):
  c = config_lib.load(os.path.join(config_lib.CONFIGS_DIR, name), arg)
  assert config_lib.resolve(c).score_patch == score
  assert config_lib.resolve(c).train_patches == train


def test_resume_from_a_checkpoint_that_saved_the_resolved_values():
  """A checkpoint whose config spelled out (4,) / 0 (the old defaults) resumes under the
  new empty default: only a real change of patch is refused."""
  new = config_lib.base_config()
  old = config_lib.base_config().to_dict()
  old["flexi"]["train_patch_sizes"] = (4,)
  config_lib.check_resume(old, new)
  old["flexi"]["train_patch_sizes"] = (8,)
  with pytest.raises(ValueError, match="flexi.train_patch_sizes"):
    config_lib.check_resume(old, new)
  old["flexi"].update(train_patch_sizes=(4,), score_patch_size=4)  # explicit base = 0
  config_lib.check_resume(old, new)

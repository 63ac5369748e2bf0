"""SigLIP, uniform (no selection): the baseline JEST is measured against.

  jest-pod train --config configs/siglip.py:runlocal --workdir workdirs/siglip

Arguments (comma-separated): runlocal (CPU-sized), data=DIR (a pool's root: DIR/web for
training and DIR/eval_* for evaluation, built by `jest-pod data build demo|icons --output
DIR`), steps=N, batch=B, pool=N (train on a fixed random N-record subset of DIR/web; 0 =
all of it), family=flexivit|siglip (siglip: the public SigLIP architecture — MAP head,
last-token text pooling, SigLIP captions — which `jest-pod export` writes for Hugging Face
and big_vision).

To fine-tune a public SigLIP instead, keep the config and add
`--config.model.init_from=PATH` (a Hugging Face folder, a big_vision .npz or a workdir):
the towers, tokenizer and image size become the checkpoint's.
"""

from jest_pod import config as config_lib
from jest_pod.config import variants


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="data/demo", steps=0, batch=0, pool=0,
                           family="flexivit")
  c = config_lib.base_config()
  c.input.data = f"{a.data}/web"
  c.input.pool_size = a.pool
  c.input.image_size = 32
  c.input.max_text_len = 16
  c.model.image_size = 32
  c.model.text["vocab_size"] = 1024
  c.model.text["max_len"] = 16
  if a.runlocal:  # a 2-core CPU: ~1M-parameter towers, B = 64
    c.batch_size = 64
    c.total_steps = 300
    variants.set_model(c, "mu/4", family=a.family)
    c.optax.lr, c.optax.warmup_steps = 2e-3, 30
    c.log_every, c.ckpt_every = 10, 100
  else:  # one accelerator: ViT-S-like towers at 32×32
    c.batch_size = 1024
    c.total_steps = 5000
    variants.set_model(c, "S/4", family=a.family)
    c.optax.lr, c.optax.warmup_steps = 1e-3, 500
    c.log_every, c.ckpt_every = 50, 500
  if a.family == "siglip":
    c.input.text_style = "siglip"  # its last-token pooling reads the sticky </s>
  c.flexi.train_patch_sizes = (c.model.image["patch_size"],)
  c.total_steps = a.steps or c.total_steps
  c.batch_size = a.batch or c.batch_size
  # The pool's eval_* sets, found when the run starts (config.resolve_evals), every
  # total_steps // 6 steps: building the config reads no folder.
  c.discover_evals.root = a.data
  return c

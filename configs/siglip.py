"""SigLIP, uniform (no selection): the baseline JEST is measured against.

  jest-pod train --config configs/siglip.py:runlocal --workdir workdirs/siglip

Arguments (comma-separated): runlocal (CPU-sized), data=DIR (the demo sets' root, built by
`jest-pod data build demo --output DIR`), steps=N, batch=B.
"""

from jest_pod import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="data/demo", steps=0, batch=0)
  c = config_lib.base_config()
  c.input.data = f"{a.data}/web"
  c.input.image_size = 32
  c.input.max_text_len = 16
  c.model.image_size = 32
  c.model.text["vocab_size"] = 1024
  c.model.text["max_len"] = 16
  if a.runlocal:  # a 2-core CPU: ~1M-parameter towers, B = 64
    c.batch_size = 64
    c.total_steps = 300
    c.model.embed_dim = 64
    c.model.image = dict(patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=128)
    c.model.text.update(width=64, depth=2, num_heads=2, mlp_dim=128)
    c.optax.lr, c.optax.warmup_steps = 2e-3, 30
    c.log_every, c.ckpt_every = 10, 100
  else:  # one accelerator: ViT-S-like towers at 32×32
    c.batch_size = 1024
    c.total_steps = 5000
    c.model.embed_dim = 384
    c.model.image = dict(patch_size=4, width=384, depth=12, num_heads=6, mlp_dim=1536)
    c.model.text.update(width=384, depth=12, num_heads=6, mlp_dim=1536)
    c.optax.lr, c.optax.warmup_steps = 1e-3, 500
    c.log_every, c.ckpt_every = 50, 500
  c.flexi.train_patch_sizes = (c.model.image["patch_size"],)
  c.total_steps = a.steps or c.total_steps
  c.batch_size = a.batch or c.batch_size
  eval_every = max(c.total_steps // 6, 1)
  c.evals.fashion = dict(type="zeroshot", data=f"{a.data}/eval_fashion", every_steps=eval_every,
                         batch_size=256)
  c.evals.retrieval = dict(type="retrieval", data=f"{a.data}/eval_retrieval",
                           every_steps=eval_every, batch_size=256)
  return c

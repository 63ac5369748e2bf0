"""The reference model θ*: SigLIP trained on the small clean curated set.

  jest-pod train --config configs/reference.py:runlocal --workdir workdirs/reference

JEST configs load it frozen with `reference=workdirs/reference`. Same towers and tokenizer
as the learner (configs/siglip.py) so the two can score the same super-batch.
"""

from jest_pod import config as config_lib



def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="data/demo", steps=0, batch=0,
                           family="flexivit")
  c = config_lib.sibling_config(__file__, "siglip.py", arg)
  c.input.data = f"{a.data}/curated"
  # The curated set shares the web pool's tokenizer, so scores are comparable.
  c.input.tokenizer = f"{a.data}/web/tokenizer.model"
  if a.runlocal and not a.steps:
    c.total_steps = 400
  return c

"""JEST: learnability-scored joint example selection with Flexi-JEST scoring.

  jest-pod train --config configs/jest.py:runlocal,reference=workdirs/reference \
      --workdir workdirs/jest

Arguments (comma-separated): everything configs/siglip.py takes (family=siglip for the
public SigLIP towers), plus method=joint|independent|uniform, score=learnability|hard_learner|easy_reference, f=0.8 (filter ratio),
chunks=16, flexi=1 (score at patch 2p, train half at p and half at 2p), reference=REF (a
workdir, a Hugging Face SigLIP folder or a big_vision .npz; its embeddings are read from
DATA/web/reference_cache when `jest-pod data cache-reference` built one),
independent=topk|sample (method=independent: the B best by L_kk, or B drawn with
p ∝ exp(L_kk) without replacement).
"""

from jest_pod import config as config_lib

SIGLIP_KEYS = ("runlocal", "data", "steps", "batch", "pool", "family")


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="data/demo", steps=0, batch=0, pool=0,
                           family="flexivit", method="joint", score="learnability", f=0.8,
                           chunks=16, flexi=True, reference="workdirs/reference",
                           independent="topk")
  c = config_lib.sibling_config(__file__, "siglip.py", arg, keys=SIGLIP_KEYS)
  c.selection.method = a.method
  c.selection.score = a.score
  c.selection.filter_ratio = a.f
  c.selection.n_chunks = a.chunks
  c.selection.reference = a.reference
  c.selection.independent_method = a.independent
  p = c.model.image["patch_size"]
  if a.flexi:
    c.flexi.score_patch_size = 2 * p
    c.flexi.train_patch_sizes = (p, 2 * p)
    c.flexi.train_fractions = (0.5, 0.5)
  return c

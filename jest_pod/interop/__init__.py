"""Public checkpoint formats, read and written with numpy only (no torch, no transformers):
`big_vision` (SigLIP .npz files) and `hf` (Hugging Face SiglipModel folders), both in the
parameter tree of models.siglip.SiglipTwoTower; `formats` recognises any checkpoint."""


class InteropError(ValueError):
  """A public checkpoint that cannot be read; the one-line message names the file and
  says what to do."""

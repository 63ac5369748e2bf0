#!/usr/bin/env python3
"""Writes the Hugging Face SigLIP fixtures of tests/test_siglip*.py (run by hand, not in CI).

Needs torch, transformers, safetensors, sentencepiece and pillow, which the project does
not depend on: run it in a separate virtual environment, e.g.

    python -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch transformers safetensors sentencepiece pillow numpy
    /tmp/torchvenv/bin/python tools/make_siglip_fixtures.py

For each of two tiny random SiglipModels it writes, under tests/fixtures/:
  <name>/                 what SiglipModel.save_pretrained + SiglipProcessor.save_pretrained
                          write (config.json, model.safetensors, spiece.model, tokenizer and
                          preprocessor configs)
  <name>_expected.npz     raw uint8 images (at the model's size, so the processor's resize
                          is the identity), raw captions, the processor's input_ids and
                          pixel_values, and transformers' outputs: image_embeds, text_embeds
                          (normalised), logits_per_image, logit_scale, logit_bias

  siglip_tiny        both towers 32 wide (as the public checkpoints), patch 8 at 32², F32
                     weights, lower-cased captions (do_lower_case=True)
  siglip_tiny_wide   vision width 48, text width 32 (the head maps 32 → 48), patch 4 at
                     16², BF16 weights, cased captions (do_lower_case=False)

Every parameter is randomised (biases, LayerNorm scales, the probe, logit_scale/bias), so a
loader that drops or transposes any of them fails the comparison.

`--check DIR --like NAME` goes the other way: DIR is a folder that jest_pod's
`interop.hf.write_folder` wrote from fixture NAME's parameters; transformers loads it
(SiglipModel + SiglipProcessor.from_pretrained) and must reproduce NAME's expected ids,
pixels, embeddings and logits:

    .venv/bin/python -c "from jest_pod.interop import hf; from jest_pod.data.tokenizer \\
      import Tokenizer as T; mc, p, pre = hf.read_folder('tests/fixtures/siglip_tiny'); \\
      hf.write_folder('/tmp/rt', mc, p, tokenizer_proto=T(pre['spiece_path']).model_proto, \\
      image_size=pre['image_size'], max_text_len=pre['max_text_len'])"
    /tmp/torchvenv/bin/python tools/make_siglip_fixtures.py --check /tmp/rt --like siglip_tiny
"""

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import (SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor,
                          SiglipTokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Training text for the tiny sentencepiece model, and the captions the tests encode (with
# punctuation, case, repeated spaces, non-ASCII, an empty one and ones longer than L).
CORPUS = """a photo of a cat
a photo of a dog sitting on the grass
two dogs playing with a red ball in the park
a black and white photo of a bicycle
an apple on a wooden table
the quick brown fox jumps over the lazy dog
a picture of an orange car parked near a tree
close up of a yellow flower with green leaves
a bird flying over the blue sea at sunset
people walking along a busy street in the city
a bowl of soup with bread on the side
an old building with tall windows and a clock
""".strip().splitlines()
CAPTIONS = [
    "a photo of a cat",
    "A Photo of a DOG!",
    "two dogs, playing -- with a red ball (in the park).",
    "  spaced    out   words  ",
    "",
    "the quick brown fox jumps over the lazy dog " * 3,
    "Émile's café: naïve façade?",
    "an apple",
]

CONFIGS = {
    "siglip_tiny": dict(
        image_size=32, dtype=torch.float32, do_lower_case=True, max_len=16, vocab_size=160,
        vision=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=4, patch_size=8),
        text=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=2)),
    "siglip_tiny_wide": dict(
        image_size=16, dtype=torch.bfloat16, do_lower_case=False, max_len=12, vocab_size=150,
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=3, patch_size=4),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4)),
}


def train_spiece(workdir: str, vocab_size: int) -> str:
  """A tiny unigram model with c4_en's special ids (0 <pad>, 1 </s>, 2 <unk>, no <s>).

  Its normaliser is one rule, U+2581 "▁" → space, instead of c4_en's nmt_nfkc: nmt_nfkc's
  compiled character map alone is 240 KB, and the rule is the part of it these captions
  meet (SiglipTokenizer prefixes "▁" to the raw caption; nmt_nfkc folds it into the
  whitespace that sentencepiece then collapses, with an identity normaliser a caption with
  leading spaces would get an extra "▁" piece). One thread: the same model every run.
  """
  # Relative names: the model stores its training paths, which must not vary between runs.
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    with open("corpus.txt", "w") as f:
      # Case-sensitive pieces for the cased config; canonicalised text has no punctuation.
      f.write("\n".join(CORPUS + [c.upper() for c in CORPUS] + [c.title() for c in CORPUS]))
    with open("rules.tsv", "w") as f:
      f.write("2581\t20\n")
    spm.SentencePieceTrainer.train(
        input="corpus.txt", model_prefix="spiece", vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        normalization_rule_tsv="rules.tsv", hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
  finally:
    os.chdir(cwd)
  return os.path.join(workdir, "spiece.model")


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Every parameter drawn afresh: weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1)
  (LayerNorm scales around 1), logit_scale around log 10, logit_bias around −10."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name == "logit_scale":
        v = np.log(10.0) + 0.3 * noise
      elif name == "logit_bias":
        v = -10.0 + noise
      elif "layer_norm" in name or "layernorm" in name:
        v = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
      elif p.ndim == 1:
        v = 0.1 * noise
      elif "embedding" in name or name.endswith("probe"):
        v = 0.5 * noise
      else:
        fan_in = int(np.prod(p.shape[1:]))
        v = noise / np.sqrt(fan_in)
      p.copy_(v)


def make(name: str, spec: dict, out_dir: str, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory() as tmp:
    vocab_file = train_spiece(tmp, spec["vocab_size"])
    tokenizer = SiglipTokenizer(vocab_file=vocab_file, model_max_length=spec["max_len"],
                                do_lower_case=spec["do_lower_case"],
                                model_input_names=["input_ids"])
    vocab = len(tokenizer)
    # The embedding is larger than the tokenizer (as in public checkpoints, e.g. 32,000
    # rows for c4_en): the reader must take the vocabulary from the tensor.
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab + 7, max_position_embeddings=spec["max_len"],
                         projection_size=spec["vision"]["hidden_size"], **spec["text"]),
        vision_config=dict(image_size=spec["image_size"], **spec["vision"]))
    model = SiglipModel(config).eval()
    randomise(model, gen)
    model = model.to(spec["dtype"])
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    size = {"height": spec["image_size"], "width": spec["image_size"]}
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size=size),
                                tokenizer=tokenizer)
    processor.save_pretrained(folder)

  # Reload both exactly as a user would, then run in float32.
  s = spec["image_size"]
  images = rng.integers(0, 256, size=(4, s, s, 3), dtype=np.uint8)
  expected = dict(images=images, captions=np.array(CAPTIONS), **run(folder, images, CAPTIONS))
  np.savez_compressed(os.path.join(out_dir, f"{name}_expected.npz"), **expected)
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  print(f"{name}: vision {cfg['vision_config']['hidden_size']} wide, text "
        f"{cfg['text_config']['hidden_size']} wide, vocab {cfg['text_config']['vocab_size']}, "
        f"tokenizer {vocab} pieces, files {sorted(os.listdir(folder))}")


def run(folder: str, images: np.ndarray, captions: list[str]) -> dict:
  """transformers' ids, pixels and outputs for a saved folder, in float32."""
  model = SiglipModel.from_pretrained(folder, attn_implementation="eager",
                                      dtype=torch.float32).eval()
  processor = SiglipProcessor.from_pretrained(folder)
  inputs = processor(images=list(images), text=captions, padding="max_length",
                     truncation=True, return_tensors="pt")
  with torch.no_grad():
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
  return dict(
      input_ids=inputs["input_ids"].numpy().astype(np.int32),
      pixel_values=inputs["pixel_values"].numpy().astype(np.float32),  # [n, 3, H, W]
      image_embeds=out.image_embeds.numpy(), text_embeds=out.text_embeds.numpy(),
      logits_per_image=out.logits_per_image.numpy(),
      logit_scale=model.logit_scale.detach().numpy(),
      logit_bias=model.logit_bias.detach().numpy())


def check(folder: str, expected_path: str) -> None:
  expected = dict(np.load(expected_path))
  got = run(folder, expected["images"], [str(c) for c in expected["captions"]])
  for k, v in got.items():
    err = float(np.max(np.abs(v.astype(np.float64) - expected[k]))) if v.size else 0.0
    print(f"{k:18s} max |diff| {err:.3g}")
    assert err <= 1e-5, k
  print(f"{folder}: transformers reproduces {expected_path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
  parser.add_argument("--check", help="a folder written by jest_pod.interop.hf.write_folder")
  parser.add_argument("--like", default="siglip_tiny", help="the fixture it was written from")
  args = parser.parse_args()
  if args.check:
    check(args.check, os.path.join(args.out, f"{args.like}_expected.npz"))
    return
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(0)
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  for i, (name, spec) in enumerate(CONFIGS.items()):
    make(name, spec, args.out, seed=i)


if __name__ == "__main__":
  main()

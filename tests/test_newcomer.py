"""What a newcomer on a fresh clone runs into: CLI help and errors, eval table order,
which evaluators a plain `--data DIR` picks, identical captions, interrupting an eval,
and quiet checkpoint loads."""

import json
import logging
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jest_pod import evaluators
from jest_pod import embed
from jest_pod.evaluators import base, metrics
from jest_pod.evaluators import cli as eval_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEST_POD = os.path.join(REPO, ".venv", "bin", "jest-pod")


def _jest_pod(*args):
  exe = [JEST_POD] if os.path.exists(JEST_POD) else [sys.executable, "-m", "jest_pod.cli"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([*exe, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


# ------------------------------------------------------------------------------ CLI


def test_train_help_exits_0():
  proc = _jest_pod("train", "--help")
  assert proc.returncode == 0, proc.stderr
  for text in ("--config", "--config.KEY=VALUE", "--workdir",
               "jest-pod train --config configs/siglip.py:runlocal --workdir /tmp/run"):
    assert text in proc.stdout


def test_train_help_in_process(capsys):
  from jest_pod.train import cli as train_cli
  assert train_cli.main(["-h"]) == 0
  assert "usage: jest-pod train" in capsys.readouterr().out


def test_misspelled_config_key_is_one_clean_paragraph():
  proc = _jest_pod("train", "--config", "configs/siglip.py:runlocal", "--workdir", "/tmp/unused",
                   "--config.optax.lrr=1")
  assert proc.returncode == 2
  err = proc.stderr
  assert "Traceback" not in err and "\\n" not in err, err
  assert "--config.optax.lrr=1" in err and "--config.optax.lr?" in err
  assert len(err.strip().splitlines()) == 1, err


def test_missing_config_file_in_process(capsys, monkeypatch):
  # Checked before any flag parsing, so safe in-process (absl FLAGS stay untouched).
  from jest_pod.train import cli as train_cli
  monkeypatch.chdir(REPO)
  assert train_cli.main(["--config", "configs/nope.py", "--workdir", "/tmp/unused"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and "configs/nope.py" in err and "configs/siglip.py" in err
  assert train_cli._missing_config_file("configs/siglip.py:runlocal") is None


def test_misspelled_config_argument():
  proc = _jest_pod("train", "--config", "configs/siglip.py:runlocall", "--workdir", "/tmp/unused")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "'runlocall' is unknown; valid: runlocal" in proc.stderr


CONFIG_FAILURES = {  # file body → what the one line must name
    "raises": ("def get_config(arg=None):\n  raise RuntimeError('boom')\n",
               ("raises.py line 2", "RuntimeError: boom")),
    "syntax": ("def get_config(arg=None):\n  return (\n", ("syntax.py line 2", "SyntaxError")),
    "import": ("import no_such_module_here\n",
               ("import.py line 1", "no_such_module_here", "install that module")),
    "no_get_config": ("x = 1\n", ("no_get_config.py", "defines no get_config()")),
}


def test_config_files_that_fail_to_load_name_the_file_and_line(tmp_path):
  """What ml_collections raises while loading each bad file → one line (issue 23)."""
  import importlib.util
  from jest_pod.train import cli as train_cli
  for name, (body, expect) in CONFIG_FAILURES.items():
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    try:  # as config_flags loads it
      spec = importlib.util.spec_from_file_location("config", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      module.get_config()
    except Exception as e:  # pylint: disable=broad-except
      msg = train_cli._config_file_error(e, str(path))
    assert msg and all(text in msg for text in expect), (name, msg)


def test_config_file_errors_end_the_command_in_one_line(tmp_path):
  """End to end: a config that raises, one that returns None (which used to say
  "--config and --workdir are required" although both were given)."""
  exe = [JEST_POD] if os.path.exists(JEST_POD) else [sys.executable, "-m", "jest_pod.cli"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  bodies = {"raises": CONFIG_FAILURES["raises"][0],
            "none": "def get_config(arg=None):\n  return None\n"}
  procs = {}
  for name, body in bodies.items():  # in parallel: each is mostly imports
    (tmp_path / f"{name}.py").write_text(body)
    procs[name] = subprocess.Popen([*exe, "train", "--config", str(tmp_path / f"{name}.py"),
                                    "--workdir", str(tmp_path / "w")], cwd=REPO, env=env,
                                   stderr=subprocess.PIPE, text=True)
  expect = {"raises": "raises.py line 2: RuntimeError: boom",
            "none": "none.py: get_config() returned None"}
  for name, proc in procs.items():
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2 and "Traceback" not in err, (name, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("jest-pod train: error:") and expect[name] in last, (name, err)


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

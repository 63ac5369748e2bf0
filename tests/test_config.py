"""Configs: every file loads; bad keys and values are clear errors."""

import builtins
import glob
import importlib.util
import os
import re
import subprocess
import sys

from etils import epath
import pytest

from jest_pod import config as config_lib
from jest_pod.config import variants
from jest_pod.data import manifest
from jest_pod.experiments.bench import step as bench_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads_and_validates(path):
  for arg in ("runlocal", ""):
    c = config_lib.load(path, arg)
    if c.selection.method != "uniform":
      c.selection.reference = c.selection.reference or "somewhere"
    config_lib.validate(c)
    assert "jest-pod train --config configs/" in open(path).read()  # run command documented


def test_bad_values_name_the_key_and_choices():
  c = config_lib.base_config()
  c.selection.method = "greedy"
  with pytest.raises(ValueError, match=r"selection.method='greedy'.*'uniform', 'independent', "
                     "'joint'"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.selection.method, c.selection.reference = "joint", ""
  with pytest.raises(ValueError, match="needs a reference model"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.selection.filter_ratio = 1.0
  with pytest.raises(ValueError, match="filter_ratio"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="unknown; valid: runlocal"):
    config_lib.parse_arg("runlcal", runlocal=False)


def test_super_batch_size():
  c = config_lib.base_config()
  c.batch_size, c.selection.method = 64, "joint"
  for f, n in ((0.5, 128), (0.8, 320), (0.9, 640)):
    c.selection.filter_ratio = f
    assert config_lib.resolve(c).super_batch == n


def test_a_super_batch_beyond_host_memory_is_refused_with_the_f_that_fits():
  """f = 0.99999 at B = 64 is N = 6.4M: 78 GB of images alone (issue 23). Refused with
  the figure and the largest f that fits; that f, and the usual ones, pass."""
  c = config_lib.load(os.path.join(ROOT, "configs", "jest.py"),
                      "runlocal,f=0.99999,batch=64")
  host = 23 * 2**30
  with pytest.raises(ValueError, match=r"filter_ratio=0\.99999 with config\.batch_size=64 "
                     r"gives a super-batch of N=6,400,000 .* need [0-9.]+ GiB .* 23\.0 GiB") as e:
    config_lib.check_host_memory(c, available=host, cpu_devices=True)
  f_max = float(re.search(r"largest filter_ratio that fits is ([0-9.]+)", str(e.value))[1])
  assert 0.99 < f_max < 0.99999
  for f in (f_max, 0.9, 0.5):
    c.selection.filter_ratio = f
    config_lib.check_host_memory(c, available=host, cpu_devices=True)
  # Nothing fits at all: the batch itself is named.
  c.selection.method, c.batch_size = "uniform", 10**8
  with pytest.raises(ValueError, match="lower config.batch_size"):
    config_lib.check_host_memory(c, available=host)
  assert config_lib.host_memory_available() > 0  # /proc/meminfo (or sysconf) reads here


def test_cli_rejects_an_unknown_override_naming_it():
  out = subprocess.run([sys.executable, "-m", "jest_pod.cli", "train", "--config",
                        os.path.join(ROOT, "configs/siglip.py:runlocal"), "--workdir", "/tmp/x",
                        "--config.optax.learning_rate=1"], capture_output=True, text=True,
                       cwd=ROOT)
  assert out.returncode == 2
  assert "learning_rate" in out.stderr


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, r"config.batch_size=0 must be an integer >= 1"),
    ("total_steps", 0, r"config.total_steps=0"),
    ("log_every", 0, r"config.log_every=0"),
    ("ckpt_every", -1, r"config.ckpt_every=-1"),
    ("keep_ckpts", 0, r"config.keep_ckpts=0"),
    ("selection.n_chunks", 0, r"config.selection.n_chunks=0"),
    ("preemption_check_every", 0, r"config.preemption_check_every=0"),
    ("device_prefetch", 0, r"config.device_prefetch=0"),
    ("time_split_every", -1, r"config.time_split_every=-1 must be >= 0"),
])
def test_counts_that_make_no_sense_name_the_key(key, value, message):
  c = config_lib.base_config()
  *path, last = key.split(".")
  (c[path[0]] if path else c)[last] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_missing_data_folder_names_it_and_the_fix(tmp_path):
  c = config_lib.base_config()
  c.input.data = str(tmp_path / "nope")
  with pytest.raises(ValueError, match=r"data folder .*nope \(config.input.data\) does not "
                     r"exist; make it with `jest-pod data ingest --input YOUR_DATA --output"):
    config_lib.check_input(c)
  c.input.data = str(tmp_path / "demo" / "web")  # a demo set: build its parent folder
  with pytest.raises(ValueError, match=r"`jest-pod data build demo --output .*demo` \(it "
                     r"writes .*demo/web\)"):
    config_lib.check_input(c)
  c.input.mixture = [(str(tmp_path), 1.0), (str(tmp_path / "gone"), 1.0)]
  with pytest.raises(ValueError, match=r"gone \(config.input.mixture\)"):
    config_lib.check_input(c)


def test_resume_check_refuses_meaning_changes_unless_allowed():
  saved = config_lib.base_config()
  c = config_lib.base_config()
  c.total_steps, c.log_every, c.evals = 5000, 1, {"x": {"type": "zeroshot"}}
  c.optax.lr = 5e-4  # neither breaking nor always allowed: logged only
  config_lib.check_resume(saved.to_dict(), c)
  c.batch_size, c.model.text["width"], c.selection.method = 512, 128, "joint"
  with pytest.raises(ValueError, match=r"(?s)batch_size: 256 → 512.*model.text.width: 64 → "
                     r"128.*selection.method: 'uniform' → 'joint'"):
    config_lib.check_resume(saved.to_dict(), c)
  c.allow_config_change = ("batch_size", "model", "selection.method")
  config_lib.check_resume(saved.to_dict(), c)


def test_eval_sets_are_found_beside_the_pool(tmp_path):
  # Not built yet: the demo pool's two sets.
  assert config_lib.eval_sets(str(tmp_path / "none")) == config_lib.DEMO_EVAL_SETS
  for name, classes in (("eval_flags", ["France"]), ("eval_retrieval", None),
                        ("web", ["x"])):
    os.makedirs(tmp_path / name)
    manifest.write(str(tmp_path / name), manifest.make(
        name=name, shards=[], skipped={}, source_counts={}, image_max_side=32,
        created_by="test", class_names=classes))
  os.makedirs(tmp_path / "eval_unbuilt")  # no manifest: not a set
  assert config_lib.eval_sets(str(tmp_path)) == {"eval_flags": "zeroshot",
                                                 "eval_retrieval": "retrieval"}
  c = config_lib.load(os.path.join(config_lib.CONFIGS_DIR, "siglip.py"),
                      f"runlocal,data={tmp_path},pool=5")
  assert not c.evals  # building the config reads no folder: the sets join at run start
  config_lib.resolve_evals(c)
  assert c.evals.flags.type == "zeroshot" and c.evals.retrieval.type == "retrieval"
  assert c.evals.flags.data == f"{tmp_path}/eval_flags" and c.input.pool_size == 5


def test_model_variants_by_name_size_both_towers_and_flexi_follows_the_patch():
  c = config_lib.base_config()
  variants.set_model(c, "S/16")
  assert dict(c.model.image) == dict(patch_size=16, width=384, depth=12, num_heads=6,
                                    mlp_dim=1536)
  assert c.model.text["width"] == 384 and c.model.text["vocab_size"] == 1000  # kept
  assert c.model.embed_dim == 384
  assert config_lib.resolve(c).score_patch == 16 and config_lib.resolve(c).train_patches == (16,)
  variants.set_model(c, "mu/8", depth=1)
  assert c.model.image["depth"] == c.model.text["depth"] == 1
  for bad in ("X/16", "B", "B/0", "B/sixteen"):
    with pytest.raises(ValueError, match="SIZE/PATCH"):
      variants.set_model(c, bad)


def test_one_image_size_and_the_siglip_text_style_are_enforced():
  c = config_lib.base_config()
  c.input.image_size, c.model.image_size = 64, 32
  with pytest.raises(ValueError, match=r"input.image_size=64 and config.model.image_size=32"):
    config_lib.validate(c)
  c = config_lib.base_config()
  variants.set_model(c, "mu/4", family="siglip")
  with pytest.raises(ValueError, match=r"family='siglip' needs config.input.text_style='siglip'"):
    config_lib.validate(c)
  c.input.text_style = "siglip"
  config_lib.validate(c)


# ------------------------------------------------ resume rules declared with each key


def test_every_base_config_key_declares_its_resume_rule(monkeypatch):
  assert config_lib.undeclared_keys() == []
  # A key set without a declaration is caught (the check sees what it looks for).
  real = config_lib._fields

  def sneaky():
    f = real()
    f.config.sneaky = 1
    return f

  monkeypatch.setattr(config_lib, "_fields", sneaky)
  assert config_lib.undeclared_keys() == ["sneaky"]


def test_resume_refuses_undeclared_keys_and_new_breaking_keys():
  saved = config_lib.base_config().to_dict()
  c = config_lib.base_config()
  with c.unlocked():
    c.my_knob = 3  # not in base_config: its effect on the run is unknown
  with pytest.raises(ValueError, match=r"(?s)does not declare.*my_knob: '<absent>' → 3.*"
                     r"allow_config_change = \('my_knob',\)"):
    config_lib.check_resume(saved, c)
  c.allow_config_change = ("my_knob",)
  config_lib.check_resume(saved, c)
  for key, value in (("selection.until", 0.5), ("distill.weight", 1.0),
                     ("distill.kind", "sigmoid")):
    c = config_lib.base_config()
    config_lib.override(c, key, value)
    with pytest.raises(ValueError, match=key):
      config_lib.check_resume(saved, c)
  c = config_lib.base_config()
  config_lib.override(c, "model.remat", True)  # declared ALLOWED: silent
  config_lib.override(c, "discover_evals.root", "data/demo")
  config_lib.check_resume(saved, c)


def test_adding_a_config_key_is_its_default_and_its_resume_rule(monkeypatch):
  """WORKSPACE_NOTES "Extending: a config key": one line in config._fields()."""
  real = config_lib._fields

  def with_key():
    f = real()
    f("selection.temperature_floor", 0.0, config_lib.BREAKS)  # the one line
    return f

  monkeypatch.setattr(config_lib, "_fields", with_key)
  c = config_lib.base_config()
  assert c.selection.temperature_floor == 0.0
  assert config_lib.undeclared_keys() == []
  config_lib.validate(c)
  config_lib.override(c, "selection.temperature_floor", "0.5")  # as --config.KEY=VALUE
  assert c.selection.temperature_floor == 0.5
  with pytest.raises(ValueError, match="selection.temperature_floor: 0.0 → 0.5"):
    config_lib.check_resume(config_lib.base_config().to_dict(), c)


# ------------------------------------------------ one override path, one loader


def test_override_parses_like_the_command_line_and_names_unknown_keys():
  c = config_lib.base_config()
  config_lib.override(c, "optax.lr", "3e-4")
  config_lib.override(c, "flexi.train_patch_sizes", "(4, 8)")
  config_lib.override(c, "model.remat", "true")
  config_lib.override(c, "input.data", "virtual:64")
  config_lib.override(c, "batch_size", 32)  # a Python value (tests, the sweep) as is
  assert (c.optax.lr, tuple(c.flexi.train_patch_sizes), c.model.remat, c.input.data,
          c.batch_size) == (3e-4, (4, 8), True, "virtual:64", 32)
  with pytest.raises(config_lib.UnknownKey) as e:
    config_lib.override(c, "optax.lrr", "1")
  assert "config.optax.lrr does not exist; did you mean config.optax.lr?" in str(e.value)
  assert "did you mean --config.optax.lr?" in e.value.describe("--config.")
  with pytest.raises(TypeError):
    config_lib.override(c, "batch_size", "many")


def test_one_loader_for_cli_bench_and_sibling_configs(tmp_path):
  path = os.path.join(config_lib.CONFIGS_DIR, "jest.py")
  a = config_lib.load(path, "runlocal,f=0.5")
  b = config_lib.sibling_config(path, "jest.py", "runlocal,f=0.5")
  assert a.to_dict() == b.to_dict() == bench_step._load(f"{path}:runlocal,f=0.5").to_dict()


# ------------------------------------------------ validation reads no disk


def _no_disk(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError(f"filesystem access: {a}")

  for mod, name in ((os, "listdir"), (os, "scandir"), (os, "walk"), (os.path, "exists"),
                    (os.path, "isdir"), (os.path, "isfile"), (builtins, "open"),
                    (epath.Path, "exists"), (epath.Path, "iterdir"), (epath.Path, "glob"),
                    (epath.Path, "is_dir"), (epath.Path, "open")):
    monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_building_and_validating_configs_reads_no_disk(path, monkeypatch):
  name = os.path.basename(path)
  modules = {}
  for n in ("siglip.py", name):  # jest.py builds on siglip.py: load both files first
    spec = importlib.util.spec_from_file_location(f"nodisk_{n[:-3]}", os.path.join(
        os.path.dirname(path), n))
    modules[n] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[n])
  monkeypatch.setattr(config_lib, "sibling_config",
                      lambda this, n, arg, keys=None: modules[n].get_config(",".join(
                          p for p in (arg or "").split(",")
                          if keys is None or p.partition("=")[0] in keys)))
  _no_disk(monkeypatch)
  for arg in ("runlocal", ""):
    c = modules[name].get_config(arg)
    if c.selection.method != "uniform":
      c.selection.reference = c.selection.reference or "somewhere"
    c.input.data = "/nowhere/web"  # validation must not look for it (check_input does)
    config_lib.validate(c)
    config_lib.resolve(c)


@pytest.mark.parametrize("key,value", [("distill.temperature", 1e400),
                                       ("optax.lr", float("nan")),
                                       ("selection.filter_ratio", float("-inf")),
                                       ("flexi.train_fractions", (float("inf"),))])
def test_every_float_setting_must_be_finite(key, value):
  """1e400 parses as inf and NaN passes every comparison: both used to run until NaN at
  step 1 (issue 32). Refused in one line naming the key."""
  c = config_lib.base_config()
  config_lib.override(c, key, value)
  with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)}(\[0\])?=(inf|nan|-inf) is "
                     r"not a finite number.*set a finite value$"):
    config_lib.validate(c)


def test_moving_the_early_selection_switch_past_the_checkpoint_is_refused():
  """until = 0.5 of 40 steps switches at step 20. A longer (or shorter) run resumed at
  step 30 would move it to 40 (or 10): "JEST" steps on B-sized batches, a FLOP jump.
  Before the switch the move is defined (the super-batches go on); after it, refused."""
  saved = config_lib.base_config()
  saved.selection.update(method="joint", reference="r", until=0.5)
  saved.total_steps = 40
  c = config_lib.base_config()
  c.selection.update(method="joint", reference="r", until=0.5)
  for total, step in ((80, 10), (30, 10), (40, 30)):  # before both switches, or unchanged
    c.total_steps = total
    config_lib.check_resume(saved.to_dict(), c, step=step)
  for total, step in ((80, 30), (20, 30), (20, 12)):
    c.total_steps = total
    with pytest.raises(ValueError, match=rf"config.total_steps: 40 → {total} moves the switch "
                       rf"from JEST super-batches to uniform batches from step 20 to step "
                       rf"{total // 2}, but the checkpoint at step {step} is already past.*"
                       r"keep config.total_steps=40 and config.selection.until=0.5"):
      config_lib.check_resume(saved.to_dict(), c, step=step)
  # until itself (allowed on purpose) moves it too; a resume without a step is unchecked.
  c.total_steps, c.selection.until, c.allow_config_change = 40, 0.25, ("selection.until",)
  with pytest.raises(ValueError, match=r"config.selection.until: 0.5 → 0.25 moves the switch"):
    config_lib.check_resume(saved.to_dict(), c, step=30)
  config_lib.check_resume(saved.to_dict(), c)
  c.selection.until = 1.0  # from switching to never switching: the input state differs
  with pytest.raises(ValueError, match=r"from step 20 to never, but the checkpoint's input "
                     r"state \(step 5\) is that of a run that switches"):
    config_lib.check_resume(saved.to_dict(), c, step=5)


# Peak RSS (bytes) of 2-step `configs/jest.py:runlocal,batch=B,score=hard_learner,f=F` runs
# on CPU (JAX's one default device), one process each, 32² toy pool (issue 32), measured
# with `tools/measure_super_batch_memory.py --batch B --f 0,...` (f = 0: a uniform run at B,
# the baseline). (B, f, peak RSS)
MEASURED_PEAKS = (
    (512, 0.0, 1_947_049_984), (512, 0.5, 2_069_303_296), (512, 0.8, 2_208_120_832),
    (512, 0.9, 2_500_816_896), (512, 0.95, 3_454_631_936),
    (64, 0.0, 1_519_898_624), (64, 0.99, 2_477_432_832), (64, 0.995, 3_921_793_024),
    (64, 0.998, 7_271_997_440),
)


def test_the_super_batch_estimate_matches_the_measured_peak():
  """The guard's estimate of a super-batch's host memory is within 1.5× of what the
  measured peak grows by over the uniform run at the same B (the count alone was 1.8×
  low at N = 12,800 and 32,000: the guard passed f = 0.999 at 6 GiB and the run took
  14 GB)."""
  def estimate(batch, f):
    c = config_lib.load(os.path.join(ROOT, "configs", "jest.py"),
                        f"runlocal,batch={batch},score=hard_learner,f={f or 0.5}"
                        + (",method=uniform" if f == 0 else ""))
    return config_lib.super_batch_host_bytes(c, cpu_devices=True)[0]

  base = {b: (peak, estimate(b, 0)) for b, f, peak in MEASURED_PEAKS if f == 0}
  for b, f, peak in MEASURED_PEAKS:
    grown = peak - base[b][0]
    if f == 0 or grown < 0.25e9:  # below, the baseline's noise dominates
      continue
    ratio = (estimate(b, f) - base[b][1]) / grown
    assert 1 / 1.5 <= ratio <= 1.5, (b, f, ratio)

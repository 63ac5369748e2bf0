"""Tests run on CPU with 8 fake devices; set before JAX is imported anywhere."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the test session, shared by the xdist workers and
# the trainer subprocesses they start (both inherit the environment): most of the suite's
# time is XLA compiling the same tiny train steps again in another run or process. Only
# compiles over 0.5 s are stored (not every op-by-op primitive); removed at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # xdist workers inherit it
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jest_pod_tests_jax_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402  (after the environment above)


def pytest_sessionfinish(session):
  if _OWN_CACHE:  # the controller (or a plain run), after its workers
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The trainer tests' toy data set: 384 examples, 16², some captions swapped."""
  from jest_pod.data.toy import build_toy  # pylint: disable=g-import-not-at-top
  return build_toy(str(tmp_path_factory.mktemp("toy")), 384, noise=0.25, image_size=16)


@pytest.fixture(scope="session")
def toy_reference(tmp_path_factory):
  """(toy, ref, cache): a 256-example toy set, a reference trained 4 steps on it (a
  workdir), and its embedding cache at TOY/reference_cache, built with batches of 48 (which
  do not divide 256). Shared by the reference-cache and distillation tests; read-only."""
  # pylint: disable=g-import-not-at-top  (after the environment above)
  from jest_pod.data.toy import build_toy
  from jest_pod.jest import reference as reference_lib
  from jest_pod.train import main as train_main
  from train_helpers import tiny_config
  toy = build_toy(str(tmp_path_factory.mktemp("toy")), 256, noise=0.25, image_size=16)
  ref = str(tmp_path_factory.mktemp("ref"))
  train_main.train(tiny_config(toy, steps=4), ref)
  return toy, ref, reference_lib.build_cache(toy, ref, batch_size=48)


@pytest.fixture(autouse=True)
def _isolated_jest_pod_logger():
  """Commands run in-process (`setup_logging`, `bench step`) configure the "jest_pod"
  logger for a console; restore it so later tests' caplog still sees its records."""
  import logging
  log = logging.getLogger("jest_pod")
  saved = (list(log.handlers), log.level, log.propagate)
  yield
  log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]

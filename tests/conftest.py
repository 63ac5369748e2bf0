"""Tests run on CPU with 8 fake devices; set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The trainer tests' toy data set: 384 examples, 16², some captions swapped."""
  from jest_pod.data.toy import build_toy  # pylint: disable=g-import-not-at-top
  return build_toy(str(tmp_path_factory.mktemp("toy")), 384, noise=0.25, image_size=16)

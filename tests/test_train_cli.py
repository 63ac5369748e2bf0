"""`jest-pod train`'s command line as a newcomer meets it: help, a misspelled key or
argument, a missing config file, and config files that fail to load — each one clean line."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEST_POD = os.path.join(REPO, ".venv", "bin", "jest-pod")


def _jest_pod(*args):
  exe = [JEST_POD] if os.path.exists(JEST_POD) else [sys.executable, "-m", "jest_pod.cli"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([*exe, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)


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
  """What loading each bad file raises → one line (issue 23)."""
  from jest_pod import config as config_lib
  from jest_pod.train import cli as train_cli
  for name, (body, expect) in CONFIG_FAILURES.items():
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    try:  # as the train CLI loads it
      config_lib.load(str(path))
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


def test_overrides_go_through_config_override():
  """--config.KEY=VALUE (or --config.KEY VALUE) is taken out of absl's flags and applied by
  config.override, the path `bench step --set` and the tests use."""
  from jest_pod.train import cli as train_cli
  rest, overrides = train_cli._split_overrides(
      ["--config", "c.py", "--config.optax.lr=3e-4", "--config.seed", "3", "--workdir", "w"])
  assert rest == ["--config", "c.py", "--workdir", "w"]
  assert overrides == [("--config.optax.lr=3e-4", "optax.lr", "3e-4"),
                       ("--config.seed=3", "seed", "3")]
  proc = _jest_pod("train", "--config", "configs/siglip.py:runlocal", "--workdir", "/tmp/unused",
                   "--config.batch_size=many")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "--config.batch_size=many:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

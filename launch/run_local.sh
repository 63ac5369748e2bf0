#!/usr/bin/env bash
# Runs N processes on this machine as N "hosts" of one JAX multi-controller run.
# Each process gets JEST_POD_COORDINATOR / JEST_POD_NUM_PROCESSES / JEST_POD_PROCESS_ID
# (read by jest_pod.parallel.distributed.initialize) and K fake CPU devices.
set -euo pipefail

readonly PROG="${0##*/}"

usage() {
  cat <<EOF
usage: $PROG [options] -- COMMAND [ARGS...]

Runs COMMAND as N processes of one multi-host JAX run on this machine, e.g.

  $PROG --num-processes 2 --devices-per-process 4 -- \\
      jest-pod train --config configs/FILE.py --workdir /tmp/run

options:
  -n, --num-processes N        processes ("hosts") to start (default 2)
  -d, --devices-per-process K  fake CPU devices per process, through
                               XLA_FLAGS=--xla_force_host_platform_device_count=K (default 4)
  -p, --port PORT              coordinator port on 127.0.0.1 (default: a free port)
      --platform NAME          JAX_PLATFORMS for the children (default cpu; '' keeps yours)
      --log-dir DIR            per-process logs DIR/process_<i>.log and pid files
                               DIR/process_<i>.pid (default: a new /tmp/jest_pod_local.* dir)
      --grace SECONDS          after a process fails, or on a second signal, wait this long
                               for the others to exit after SIGTERM before SIGKILL (default 60)
  -q, --quiet                  do not echo process 0's log to the terminal
  -h, --help                   this text

Exit status: 0 when every process exits 0; otherwise the first non-zero status seen.
SIGTERM/SIGINT (Ctrl-C) are forwarded to every process as SIGTERM (the trainer then
saves a checkpoint and exits); a second one sends SIGKILL.
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

log() { echo "[$PROG] $*" >&2; }

free_port() {
  python3 - <<'PY' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

# Drops any existing device-count flag from XLA_FLAGS and appends ours.
xla_flags_with_devices() {
  local count=$1 flag kept=()
  for flag in ${XLA_FLAGS:-}; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || kept+=("$flag")
  done
  kept+=("--xla_force_host_platform_device_count=$count")
  echo "${kept[*]}"
}

NUM_PROCESSES=2
DEVICES=4
PORT=""
PLATFORM=cpu
LOG_DIR=""
GRACE=60
QUIET=0

parse_args() {
  while (($#)); do
    case $1 in
      -n|--num-processes) NUM_PROCESSES=${2:?"$1 needs a value"}; shift 2 ;;
      -d|--devices-per-process) DEVICES=${2:?"$1 needs a value"}; shift 2 ;;
      -p|--port) PORT=${2:?"$1 needs a value"}; shift 2 ;;
      --platform) PLATFORM=${2?"$1 needs a value"}; shift 2 ;;
      --log-dir) LOG_DIR=${2:?"$1 needs a value"}; shift 2 ;;
      --grace) GRACE=${2:?"$1 needs a value"}; shift 2 ;;
      -q|--quiet) QUIET=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; COMMAND=("$@"); return ;;
      *) die "unknown option '$1' (put the command to run after '--')" ;;
    esac
  done
}

COMMAND=()
PIDS=()
TAIL_PID=""
SIGNALS=0

kill_all() {
  local sig=$1 pid
  for pid in "${PIDS[@]}"; do
    kill "-$sig" "$pid" 2>/dev/null || true
  done
}

on_signal() {
  SIGNALS=$((SIGNALS + 1))
  if ((SIGNALS == 1)); then
    log "signal received: forwarding SIGTERM to ${#PIDS[@]} processes (again to SIGKILL)"
    kill_all TERM
  else
    log "second signal: SIGKILL to all processes"
    kill_all KILL
  fi
}

# Waits up to GRACE seconds for the still-running processes, then SIGKILLs them.
terminate_rest() {
  local deadline=$((SECONDS + GRACE)) pid alive
  kill_all TERM
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 1
  done
  log "processes still running after ${GRACE}s: SIGKILL"
  kill_all KILL
}

cleanup() {
  if [[ -n $TAIL_PID ]]; then
    kill "$TAIL_PID" 2>/dev/null || true
  fi
}

main() {
  parse_args "$@"
  ((${#COMMAND[@]})) || die "no command given; put it after '--'"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer"
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer"
  [[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds"
  [[ -n $PORT ]] || PORT=$(free_port)
  [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a port number"
  if [[ -z $LOG_DIR ]]; then
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/jest_pod_local.XXXXXX")
  fi
  mkdir -p "$LOG_DIR"

  local xla_flags i
  xla_flags=$(xla_flags_with_devices "$DEVICES")
  trap on_signal TERM INT
  trap cleanup EXIT
  log "$NUM_PROCESSES processes x $DEVICES devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    (
      export JEST_POD_COORDINATOR="127.0.0.1:$PORT"
      export JEST_POD_NUM_PROCESSES="$NUM_PROCESSES"
      export JEST_POD_PROCESS_ID="$i"
      export XLA_FLAGS="$xla_flags"
      if [[ -n $PLATFORM ]]; then export JAX_PLATFORMS="$PLATFORM"; fi
      exec "${COMMAND[@]}"
    ) >"$LOG_DIR/process_$i.log" 2>&1 </dev/null &
    PIDS+=("$!")
    echo "$!" >"$LOG_DIR/process_$i.pid"
  done
  if ((!QUIET)); then
    tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
    TAIL_PID=$!
  fi

  # Poll rather than `wait -n`: a trapped signal interrupting `wait -n` loses track of
  # children that exit meanwhile. `wait PID` on an exited child returns its status.
  local live=("${PIDS[@]}") status=0 pid rc idx
  while ((${#live[@]})); do
    pid=""
    for idx in "${live[@]}"; do
      if ! kill -0 "$idx" 2>/dev/null; then pid=$idx; break; fi
    done
    if [[ -z $pid ]]; then sleep 0.5; continue; fi
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    local still=() p
    for p in "${live[@]}"; do [[ $p == "$pid" ]] || still+=("$p"); done
    live=("${still[@]}")
    for idx in "${!PIDS[@]}"; do
      [[ ${PIDS[$idx]} == "$pid" ]] && break
    done
    if ((rc != 0)); then
      log "process $idx (pid $pid) exited with status $rc; log: $LOG_DIR/process_$idx.log"
      tail -n 20 "$LOG_DIR/process_$idx.log" | sed "s/^/[process $idx] /" >&2 || true
      if ((status == 0)); then
        status=$rc
        if ((${#live[@]})); then
          log "stopping the other processes (SIGTERM, SIGKILL after ${GRACE}s)"
          terminate_rest
        fi
      fi
    fi
  done
  sleep 0.5  # let the echo of process 0's log catch up
  if ((status == 0)); then
    log "all $NUM_PROCESSES processes exited 0; logs in $LOG_DIR"
  fi
  return "$status"
}

main "$@"

#!/usr/bin/env bash
# Runs a jest_pod config on a Cloud TPU VM pod slice, from a workstation with gcloud.
# Every worker of the slice runs the same `jest-pod train` command (JAX multi-controller);
# jest_pod.parallel.distributed.initialize() joins them (JEST_POD_TPU_POD=1 is set for it).
# The remote scripts below are single-quoted on purpose: their $VARS expand on the workers.
# shellcheck disable=SC2016
set -euo pipefail

readonly PROG="${0##*/}"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
GCLOUD=${GCLOUD:-gcloud}

usage() {
  cat <<EOF
usage: $PROG COMMAND [options] [-- extra 'jest-pod train' args]

Run a jest_pod config on a Cloud TPU VM pod slice.

commands:
  create    create the slice (tpu-vm create; a queued resource with --spot or --queued,
            waiting until it is ACTIVE)
  ship      copy the code to every worker: a tarball of the commit checked out here
            (git archive HEAD), or with --git-commit/--repo-url a git clone on each worker
  install   create (or reuse) a virtual environment on every worker and install the
            code with jax[tpu]; a second run reuses the environment and skips pip when
            pyproject.toml has not changed
  run       start 'jest-pod train --config C --workdir W' on all workers, in the
            background (setsid nohup), one log per worker: ~/jest_pod_logs/train.log
  up        create (unless the slice exists) + ship + install + run
  logs      follow a worker's log (--worker N, default 0)
  status    describe the slice and show whether training runs on each worker
  stop      send SIGTERM to the training process on all workers (the trainer saves a
            checkpoint and exits); waits up to --wait seconds for them to exit
  delete    delete the slice (the queued resource with --spot/--queued)

slice options (all commands):
  --name NAME               TPU name [env JEST_POD_TPU_NAME] (required)
  --zone ZONE               e.g. us-west4-a [env JEST_POD_ZONE] (required)
  --project PROJECT         [env JEST_POD_PROJECT] (default: gcloud's configured project)
  --spot                    spot capacity, through a queued resource (create/up/delete)
  --queued                  a queued resource without spot: waits for capacity (long runs)
  --dry-run                 print every gcloud command (a runnable script) and change nothing

create/up:
  --accelerator-type TYPE   e.g. v5litepod-64, v4-32, v5p-128, v6e-64 (required)
  --runtime-version V       TPU VM image (default from the type: v5litepod ->
                            v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e ->
                            v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base)
  --wait-timeout SECONDS    give up waiting for a queued resource (default 86400)
  --poll SECONDS            how often to check it (default 30)

ship/up:
  --git-commit SHA          clone this commit on every worker instead of copying a tarball
  --repo-url URL            the repository to clone (with --git-commit)
  --remote-dir DIR          code directory on the workers, relative to home (default jest_pod)

install/up:
  --venv DIR                virtual environment on the workers (default jest_pod_venv)
  --python VERSION          Python for a new environment (default 3.11; fetched with uv
                            when the image lacks python<VERSION>)
  --pip-extra SPEC          installed with the code (default 'jax[tpu]')
  --force                   reinstall even when the environment is up to date

run/up:
  --config FILE[:ARG]       e.g. configs/pod_vit_b16.py (required)
  --workdir DIR             checkpoints and logs; gs://BUCKET/PATH on a multi-host slice
                            (required). Running again with the same workdir resumes.
  --env KEY=VALUE           extra environment for the trainer (repeatable)
  -- ARGS...                passed on to 'jest-pod train', e.g. --config.total_steps=1000

logs:   --worker N (default 0; 'all' prints the tail of every worker) --lines N (default 100)
        --no-follow
stop:   --wait SECONDS (default 300; 0 = do not wait) --kill (SIGKILL the process group)
delete: --yes (do not ask)

examples:
  $PROG up --name jest-b16 --zone us-west4-a --accelerator-type v5litepod-64 --spot \\
      --config configs/pod_vit_b16.py --workdir gs://my-bucket/jest/b16
  $PROG logs --name jest-b16 --zone us-west4-a
  $PROG stop --name jest-b16 --zone us-west4-a
  $PROG delete --name jest-b16 --zone us-west4-a --spot --yes
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

log() { echo "[$PROG] $*" >&2; }

# Quotes one word for bash the way Python's shlex.quote does (readable dry-run output).
quote_arg() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Double-quotes one word for the remote scripts (they are themselves single-quoted when printed).
dquote() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//\$/\\\$}
  s=${s//\`/\\\`}
  printf '"%s"' "$s"
}

join_quoted() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote_arg "$arg")"; done
  printf '%s' "$out"
}

join_dquoted() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(dquote "$arg")"; done
  printf '%s' "$out"
}

# Runs a gcloud command that changes something; with --dry-run prints it instead.
gcloud_do() {
  if ((DRY_RUN)); then
    { join_quoted gcloud "$@"; echo; } >&3
    return 0
  fi
  log "$(join_quoted gcloud "$@")"
  "$GCLOUD" "$@"
}

# Runs a read-only gcloud query and prints its output; with --dry-run prints the command
# and returns 1 (the answer is unknown: callers treat it as "not there").
gcloud_query() {
  if ((DRY_RUN)); then
    { join_quoted gcloud "$@"; echo; } >&3
    return 1
  fi
  "$GCLOUD" "$@" 2>/dev/null
}

# --- options --------------------------------------------------------------------------

COMMAND=""
NAME=${JEST_POD_TPU_NAME:-}
ZONE=${JEST_POD_ZONE:-}
PROJECT=${JEST_POD_PROJECT:-}
ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
SPOT=0
QUEUED=0
DRY_RUN=0
WAIT_TIMEOUT=86400
POLL=30
GIT_COMMIT=""
REPO_URL=""
REMOTE_DIR=jest_pod
VENV_DIR=jest_pod_venv
LOGS_DIR=jest_pod_logs
PYTHON_VERSION=3.11
PIP_EXTRA='jax[tpu]'
FORCE=0
CONFIG=""
WORKDIR=""
ENVS=()
TRAIN_ARGS=()
WORKER=0
LINES=100
FOLLOW=1
STOP_WAIT=300
KILL=0
YES=0

need_value() {
  (($2 >= 2)) || die "option $1 needs a value"
}

parse_args() {
  while (($#)); do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --spot) SPOT=1; shift; continue ;;
      --queued) QUEUED=1; shift; continue ;;
      --force) FORCE=1; shift; continue ;;
      --kill) KILL=1; shift; continue ;;
      --yes|-y) YES=1; shift; continue ;;
      --no-follow) FOLLOW=0; shift; continue ;;
      --) shift; TRAIN_ARGS=("$@"); return ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --opt=value -> --opt value
    esac
    case $1 in
      --name) need_value "$1" $#; NAME=$2 ;;
      --zone) need_value "$1" $#; ZONE=$2 ;;
      --project) need_value "$1" $#; PROJECT=$2 ;;
      --accelerator-type) need_value "$1" $#; ACCELERATOR_TYPE=$2 ;;
      --runtime-version) need_value "$1" $#; RUNTIME_VERSION=$2 ;;
      --wait-timeout) need_value "$1" $#; WAIT_TIMEOUT=$2 ;;
      --poll) need_value "$1" $#; POLL=$2 ;;
      --git-commit) need_value "$1" $#; GIT_COMMIT=$2 ;;
      --repo-url) need_value "$1" $#; REPO_URL=$2 ;;
      --remote-dir) need_value "$1" $#; REMOTE_DIR=$2 ;;
      --venv) need_value "$1" $#; VENV_DIR=$2 ;;
      --python) need_value "$1" $#; PYTHON_VERSION=$2 ;;
      --pip-extra) need_value "$1" $#; PIP_EXTRA=$2 ;;
      --config) need_value "$1" $#; CONFIG=$2 ;;
      --workdir) need_value "$1" $#; WORKDIR=$2 ;;
      --env) need_value "$1" $#; ENVS+=("$2") ;;
      --worker) need_value "$1" $#; WORKER=$2 ;;
      --lines) need_value "$1" $#; LINES=$2 ;;
      --wait) need_value "$1" $#; STOP_WAIT=$2 ;;
      -*) die "unknown option '$1'" ;;
      *)
        [[ -z $COMMAND ]] || die "unexpected argument '$1' (train args go after '--')"
        COMMAND=$1; shift; continue ;;
    esac
    shift 2
  done
}

require() {
  local value=$1 what=$2
  [[ -n $value ]] || die "$COMMAND needs $what"
}

require_int() {
  [[ $1 =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '$1'"
}

check_options() {
  require "$NAME" "--name (or JEST_POD_TPU_NAME)"
  require "$ZONE" "--zone (or JEST_POD_ZONE)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME': use lower-case letters, digits and '-', starting with a letter"
  if ((SPOT)); then QUEUED=1; fi
  require_int "$WAIT_TIMEOUT" --wait-timeout
  require_int "$POLL" --poll
  require_int "$LINES" --lines
  require_int "$STOP_WAIT" --wait
  [[ $WORKER == all ]] || require_int "$WORKER" --worker
  if [[ -n $GIT_COMMIT || -n $REPO_URL ]]; then
    [[ -n $GIT_COMMIT && -n $REPO_URL ]] || die "--git-commit and --repo-url go together"
  fi
  local kv
  for kv in "${ENVS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': expected KEY=VALUE"
  done
  if ((!DRY_RUN)) && ! command -v "$GCLOUD" >/dev/null 2>&1; then
    die "'$GCLOUD' not found: install the Google Cloud SDK (or try --dry-run)"
  fi
}

# Location flags shared by every gcloud tpus command.
LOCATION=()
set_location() {
  LOCATION=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=("--project=$PROJECT"); fi
}

default_runtime_version() {
  case $1 in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --runtime-version for accelerator type '$1'; pass one" ;;
  esac
}

# --- remote scripts (one line each: they travel as ssh --command) -----------------------

# Sets CODE, VENV, LOGS (absolute, under the worker's home) and W (the worker's name).
remote_prologue() {
  printf 'set -euo pipefail; cd "$HOME"; CODE=$(realpath -m %s); VENV=$(realpath -m %s); ' \
    "$(dquote "$REMOTE_DIR")" "$(dquote "$VENV_DIR")"
  printf 'LOGS=$(realpath -m %s); W=$(hostname); ' "$(dquote "$LOGS_DIR")"
}

remote_refuse_if_running() {
  printf '%s' 'if [ -f "$LOGS/train.pid" ] && kill -0 "$(cat "$LOGS/train.pid")" 2>/dev/null; then echo "$W: training is running (pid $(cat "$LOGS/train.pid")): stop it first (run_pod.sh stop)" >&2; exit 1; fi; '
}

remote_unpack_tarball() {
  local tarball=$1 commit=$2
  remote_prologue
  remote_refuse_if_running
  printf 'rm -rf "$CODE.new"; mkdir -p "$CODE.new"; tar -xzf %s -C "$CODE.new"; ' "$(dquote "$tarball")"
  printf 'echo %s > "$CODE.new/GIT_COMMIT"; rm -rf "$CODE"; mv "$CODE.new" "$CODE"; rm -f %s; ' \
    "$(dquote "$commit")" "$(dquote "$tarball")"
  printf 'echo "$W: code at %s in $CODE"' "$commit"
}

remote_git_clone() {
  remote_prologue
  remote_refuse_if_running
  printf 'rm -rf "$CODE.new"; git clone --quiet %s "$CODE.new"; ' "$(dquote "$REPO_URL")"
  printf 'git -C "$CODE.new" checkout --quiet %s; rm -rf "$CODE"; mv "$CODE.new" "$CODE"; ' \
    "$(dquote "$GIT_COMMIT")"
  printf 'echo "$W: code at $(git -C "$CODE" rev-parse HEAD) in $CODE"'
}

remote_install() {
  local py="python$PYTHON_VERSION" extra
  extra=$(dquote "$PIP_EXTRA")
  remote_prologue
  remote_refuse_if_running
  printf '[ -f "$CODE/pyproject.toml" ] || { echo "$W: no code in $CODE: run %s ship first" >&2; exit 1; }; ' "$PROG"
  if ((FORCE)); then printf 'rm -f "$VENV/.jest_pod_installed"; '; fi
  printf 'if [ -x "$VENV/bin/python" ]; then echo "$W: reusing $VENV"; '
  printf 'elif command -v %s >/dev/null 2>&1; then %s -m venv "$VENV"; echo "$W: created $VENV"; ' "$py" "$py"
  printf 'else curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR="$HOME/.local/bin" INSTALLER_NO_MODIFY_PATH=1 sh >/dev/null; '
  printf '"$HOME/.local/bin/uv" venv --quiet --seed --python %s "$VENV"; echo "$W: created $VENV (uv)"; fi; ' "$(dquote "$PYTHON_VERSION")"
  printf 'STAMP="$(sha256sum "$CODE/pyproject.toml" | cut -c1-64) %s"; ' "${PIP_EXTRA//[^A-Za-z0-9_.=<>,\[\]-]/_}"
  printf 'if [ -x "$VENV/bin/jest-pod" ] && [ "$(cat "$VENV/.jest_pod_installed" 2>/dev/null)" = "$STAMP" ]; then echo "$W: packages up to date"; '
  printf 'else "$VENV/bin/python" -m pip install --quiet --upgrade pip; '
  printf '"$VENV/bin/python" -m pip install --quiet -e "$CODE" %s; ' "$extra"
  printf 'echo "$STAMP" > "$VENV/.jest_pod_installed"; echo "$W: installed into $VENV"; fi'
}

remote_run() {
  local train=(train --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")
  local envs=(JEST_POD_TPU_POD=1 "${ENVS[@]}") cmd="" word
  for word in "${train[@]}"; do cmd+=" $(dquote "$word")"; done
  remote_prologue
  remote_refuse_if_running
  printf '[ -x "$VENV/bin/jest-pod" ] || { echo "$W: $VENV/bin/jest-pod missing: run %s install first" >&2; exit 1; }; ' "$PROG"
  printf 'mkdir -p "$LOGS"; LOG="$LOGS/train-$(date -u +%%Y%%m%%d-%%H%%M%%S).log"; ln -sfn "$LOG" "$LOGS/train.log"; cd "$CODE"; '
  printf 'env %s setsid nohup "$VENV/bin/jest-pod"%s > "$LOG" 2>&1 < /dev/null & ' "$(join_dquoted "${envs[@]}")" "$cmd"
  printf 'echo $! > "$LOGS/train.pid"; echo "$W: started pid $(cat "$LOGS/train.pid"), log $LOG"'
}

remote_stop() {
  remote_prologue
  printf 'PIDF="$LOGS/train.pid"; '
  printf 'if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then PID=$(cat "$PIDF"); '
  if ((KILL)); then
    printf 'kill -KILL -- "-$PID" 2>/dev/null || kill -KILL "$PID"; echo "$W: sent SIGKILL to $PID and its process group"; '
  else
    printf 'kill -TERM "$PID"; echo "$W: sent SIGTERM to $PID"; '
  fi
  printf 'for _ in $(seq %d); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done; ' "$STOP_WAIT"
  printf 'if kill -0 "$PID" 2>/dev/null; then echo "$W: pid $PID still running after %ds (saving a checkpoint?): see the log, or stop --kill"; ' "$STOP_WAIT"
  printf 'else echo "$W: pid $PID exited"; fi; '
  printf 'else echo "$W: no training process running"; fi'
}

remote_status() {
  remote_prologue
  printf 'if [ -f "$LOGS/train.pid" ] && kill -0 "$(cat "$LOGS/train.pid")" 2>/dev/null; then echo "$W: running, pid $(cat "$LOGS/train.pid")"; else echo "$W: not running"; fi; '
  printf 'tail -n 1 "$LOGS/train.log" 2>/dev/null | sed "s/^/$W: last log line: /" || true'
}

remote_logs() {
  remote_prologue
  if ((FOLLOW)) && [[ $WORKER != all ]]; then
    printf 'tail -n %d -F "$LOGS/train.log"' "$LINES"
  else
    printf 'echo "== $W"; tail -n %d "$LOGS/train.log"' "$LINES"
  fi
}

# --- commands -----------------------------------------------------------------------------

ssh_all() {
  gcloud_do compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" "--command=$1"
}

queued_state() {
  gcloud_query compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
    '--format=value(state.state)'
}

wait_until_active() {
  local deadline=$((SECONDS + WAIT_TIMEOUT)) state
  if ((DRY_RUN)); then
    echo "# repeat until the state is ACTIVE:" >&3
    queued_state || true
    return 0
  fi
  while :; do
    state=$(queued_state) || state="NOT_FOUND"
    case $state in
      ACTIVE) log "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        die "queued resource $NAME is $state: see 'gcloud compute tpus queued-resources describe $NAME --zone=$ZONE'; delete it ($PROG delete --queued) and create again" ;;
    esac
    ((SECONDS < deadline)) ||
      die "queued resource $NAME still $state after ${WAIT_TIMEOUT}s; it stays queued: wait with '$PROG create --queued' again or delete it"
    log "queued resource $NAME is ${state:-unknown}; checking again in ${POLL}s"
    sleep "$POLL"
  done
}

cmd_create() {
  require "$ACCELERATOR_TYPE" "--accelerator-type (e.g. v5litepod-64)"
  [[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
  if ((QUEUED)); then
    local flags=(--node-id="$NAME" "${LOCATION[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
                 "--runtime-version=$RUNTIME_VERSION")
    if ((SPOT)); then flags+=(--spot); fi
    gcloud_do compute tpus queued-resources create "$NAME" "${flags[@]}"
    wait_until_active
  else
    gcloud_do compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION"
  fi
}

# True when the slice (or its queued resource) already exists; false in --dry-run.
slice_exists() {
  if ((QUEUED)); then
    local state
    state=$(queued_state) || return 1
    [[ -n $state ]] || return 1
    log "queued resource $NAME exists ($state)"
    case $state in
      ACTIVE) return 0 ;;
      *) wait_until_active; return 0 ;;
    esac
  fi
  gcloud_query compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" '--format=value(state)' \
    >/dev/null || return 1
  log "TPU $NAME exists: not creating it"
}

cmd_ship() {
  if [[ -n $GIT_COMMIT ]]; then
    ssh_all "$(remote_git_clone)"
    return
  fi
  local commit tmp tarball remote_tarball
  commit=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null) ||
    die "$REPO_ROOT is not a git checkout: use --git-commit SHA --repo-url URL"
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    log "warning: uncommitted changes in $REPO_ROOT are NOT shipped: shipping HEAD ${commit:0:12}; commit them first to run them"
  fi
  remote_tarball="/tmp/jest_pod-${commit:0:12}.tar.gz"
  if ((DRY_RUN)); then
    tarball="${TMPDIR:-/tmp}/jest_pod_ship.DRYRUN/jest_pod-${commit:0:12}.tar.gz"
    echo "# $(join_quoted git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$commit")"
  else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/jest_pod_ship.XXXXXX")
    # shellcheck disable=SC2064  # expand $tmp now: it is local
    trap "rm -rf '$tmp'" EXIT
    tarball="$tmp/jest_pod-${commit:0:12}.tar.gz"
    git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$commit"
    log "packed HEAD ${commit:0:12} ($(du -h "$tarball" | cut -f1))"
  fi
  gcloud_do compute tpus tpu-vm scp "$tarball" "$NAME:$remote_tarball" --worker=all "${LOCATION[@]}"
  ssh_all "$(remote_unpack_tarball "$remote_tarball" "$commit")"
}

cmd_install() {
  ssh_all "$(remote_install)"
}

cmd_run() {
  require "$CONFIG" "--config (e.g. configs/pod_vit_b16.py)"
  require "$WORKDIR" "--workdir (gs://BUCKET/PATH)"
  if [[ $WORKDIR != gs://* ]]; then
    log "warning: --workdir '$WORKDIR' is not gs://: on a multi-host slice every worker writes its own disk, and multi-host Orbax checkpoints need one shared directory"
  fi
  if [[ -z $GIT_COMMIT && ! -f $REPO_ROOT/${CONFIG%%:*} ]]; then
    log "warning: ${CONFIG%%:*} is not in $REPO_ROOT; the path is read on the workers, relative to the code directory"
  fi
  ssh_all "$(remote_run)"
  if ((!DRY_RUN)); then log "started; follow it with: $PROG logs --name $NAME --zone $ZONE"; fi
}

cmd_up() {
  if slice_exists; then :; else cmd_create; fi
  cmd_ship
  cmd_install
  cmd_run
}

cmd_logs() {
  local worker="--worker=$WORKER"
  gcloud_do compute tpus tpu-vm ssh "$NAME" "$worker" "${LOCATION[@]}" "--command=$(remote_logs)"
}

cmd_status() {
  if ((QUEUED)); then
    gcloud_do compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
      '--format=value(state.state)'
  fi
  gcloud_do compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
    '--format=value(state,acceleratorType,health)'
  ssh_all "$(remote_status)"
}

cmd_stop() {
  ssh_all "$(remote_stop)"
}

cmd_delete() {
  local what="TPU $NAME"
  if ((QUEUED)); then what="queued resource $NAME (and its TPU)"; fi
  if ((!DRY_RUN && !YES)); then
    [[ -t 0 ]] || die "delete asks for confirmation: pass --yes"
    local answer
    read -r -p "Delete $what in $ZONE? [y/N] " answer
    [[ $answer == [yY]* ]] || { log "not deleted"; return 1; }
  fi
  if ((QUEUED)); then
    gcloud_do compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
  else
    gcloud_do compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
  fi
}

main() {
  (($#)) || { usage; exit 2; }
  exec 3>&1  # --dry-run prints here, also from inside $(...)
  parse_args "$@"
  [[ -n $COMMAND ]] || die "no command given"
  case $COMMAND in
    create|ship|install|run|up|logs|status|stop|delete) ;;
    *) die "unknown command '$COMMAND'" ;;
  esac
  check_options
  set_location
  "cmd_$COMMAND"
}

main "$@"

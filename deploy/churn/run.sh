#!/usr/bin/env bash
# Container churn test: a compose cluster (coordinator, 3 peers, a DiLoCo
# trainer beside each) trains while peers are killed, paused, cut off the
# network, restarted, and a fourth one joins; deploy/churn/churn.py checks
# that training goes on, model hashes agree at every outer step, and failures
# are typed errors within the bound.
#
#   deploy/churn/run.sh [--short] [--rev REV] [--standin] [--keep-logs]
#
#   --short      one round of disturbances (CI); default: two rounds
#   --rev REV    build the images from git revision REV (git archive), not from
#                the working tree (which may hold half-done edits)
#   --standin    use deploy/trainer/standin_train.py instead of
#                examples/diloco_train.py (plumbing only)
#   --keep-logs  keep deploy/churn/logs/<run>/ even when the run passes
#
# Sets itself up as root: installs Debian's docker.io, docker-compose and
# debootstrap when missing, starts dockerd when none runs (and stops it at the
# end), makes a base image with debootstrap when none can be pulled, fills
# deploy/wheelhouse/ from the host's pip index and builds the images offline
# from it (cached between runs).
# Env: COLLNET_BASE_IMAGE (skip the base image search), CHURN_BOUND_S (30), CHURN_JOIN_BOUND_S (90),
# CHURN_INNER_STEPS (10).
# Exit codes: 0 pass, 1 invariant violated, 2 setup error, 77 Docker cannot be
# installed or started here (callers may skip).
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"

short=0
trainer=/opt/collnet-examples/diloco_train.py
keep_logs=0
rev=""
while [ $# -gt 0 ]; do
  case "$1" in
    --short) short=1 ;;
    --rev) [ $# -ge 2 ] || { echo "run.sh: --rev needs a revision" >&2; exit 2; }; rev="$2"; shift ;;
    --standin) trainer=/opt/collnet-examples/standin_train.py ;;
    --keep-logs) keep_logs=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[churn $(date -u +%H:%M:%S)] $*"; }
die() { echo "run.sh: error: $*" >&2; exit 2; }
skip() { echo "run.sh: cannot run Docker here: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "not root (dockerd, apt-get and debootstrap need root)"

t_start=$SECONDS
logdir="$repo/deploy/churn/logs/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$logdir"
phase_times=()
phase() { phase_times+=("$1=$(( SECONDS - phase_start ))s"); phase_start=$SECONDS; }
phase_start=$SECONDS

# -- Docker -------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
   || ! command -v debootstrap >/dev/null; then
  say "installing docker.io docker-compose debootstrap (apt)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      docker.io docker-compose debootstrap; } > "$logdir/apt.log" 2>&1 \
    || { tail -n 20 "$logdir/apt.log" >&2; skip "apt-get install docker.io docker-compose debootstrap failed"; }
fi

dockerd_pid=""
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: $logdir/dockerd.log)"
  dockerd > "$logdir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    kill "$dockerd_pid" 2>/dev/null || true
    tail -n 20 "$logdir/dockerd.log" >&2
    skip "dockerd did not start (log above)"
  fi
fi
# The legacy builder: it needs no buildx plugin and caches layers the same way.
export DOCKER_BUILDKIT=0
phase docker

project="collnetchurn$$"
compose=(docker-compose -f "$repo/deploy/docker-compose.yml" -p "$project")
secret_dir=""
churn_pid=""
src_dir=""

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  set +e
  if [ -n "$churn_pid" ]; then
    kill "$churn_pid" 2>/dev/null && wait "$churn_pid" 2>/dev/null
  fi
  if [ -n "${project:-}" ] && docker info >/dev/null 2>&1; then
    "${compose[@]}" --profile scale logs --no-color --timestamps > "$logdir/compose.log" 2>&1
    for cid in $("${compose[@]}" --profile scale ps -q 2>/dev/null); do
      [ "$(docker inspect -f '{{.State.Paused}}' "$cid" 2>/dev/null)" = true ] && docker unpause "$cid" >/dev/null
    done
    "${compose[@]}" --profile scale down -v --remove-orphans -t 10 > "$logdir/down.log" 2>&1 \
      || echo "run.sh: warning: docker-compose down failed (see $logdir/down.log)" >&2
  fi
  [ -n "$secret_dir" ] && rm -rf "$secret_dir"
  [ -n "$src_dir" ] && rm -rf "$src_dir"
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null
  fi
  if [ "$rc" = 0 ] && [ "$keep_logs" = 0 ]; then
    rm -rf "$logdir"
  else
    echo "run.sh: logs kept in $logdir" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- images -------------------------------------------------------------------
base="${COLLNET_BASE_IMAGE:-}"
if [ -z "$base" ]; then
  for candidate in python:3.11-slim collnet-base:bookworm; do
    if docker image inspect "$candidate" >/dev/null 2>&1; then base=$candidate; break; fi
  done
fi
if [ -z "$base" ]; then
  say "no base image here: trying docker pull python:3.11-slim"
  if timeout 60 docker pull python:3.11-slim > "$logdir/pull.log" 2>&1; then
    base=python:3.11-slim
  else
    say "no registry reachable: building collnet-base:bookworm with debootstrap"
    bash "$repo/deploy/churn/base-image.sh" collnet-base:bookworm
    base=collnet-base:bookworm
  fi
fi
phase base-image

build_args=(--network host --build-arg "BASE_IMAGE=$base")
say "filling deploy/wheelhouse from the host's pip index"
mapfile -t deps < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
if python3 -m pip download -q -d deploy/wheelhouse --only-binary=:all: \
     'setuptools>=77' wheel "${deps[@]}" 'torch==2.13.0' > "$logdir/wheelhouse.log" 2>&1; then
  build_args+=(--build-arg PIP_NO_INDEX=1)   # everything is in the wheelhouse
else
  say "pip download failed (see $logdir/wheelhouse.log): the build uses the index"
fi

context="$repo"
if [ -n "$rev" ]; then
  git -C "$repo" rev-parse --verify --quiet "$rev^{commit}" >/dev/null || die "no such revision: $rev"
  src_dir="$(mktemp -d "${TMPDIR:-/var/tmp}/collnet-src.XXXXXX")"
  git -C "$repo" archive "$rev" | tar -x -C "$src_dir"
  rm -rf "$src_dir/deploy/wheelhouse"
  cp -al "$repo/deploy/wheelhouse" "$src_dir/deploy/wheelhouse" 2>/dev/null \
    || cp -a "$repo/deploy/wheelhouse" "$src_dir/deploy/wheelhouse"
  context="$src_dir"
  say "building from $rev ($(git -C "$repo" rev-parse --short "$rev"))"
fi

image=collnet:churn
trainer_image=collnet-trainer:churn
say "building $image from $base"
docker build "${build_args[@]}" -t "$image" "$context" > "$logdir/build.log" 2>&1 \
  || { tail -n 30 "$logdir/build.log" >&2; die "docker build failed (log above)"; }
say "building $trainer_image"
docker build "${build_args[@]}" --build-arg "COLLNET_IMAGE=$image" \
  -f "$context/deploy/trainer/Dockerfile" -t "$trainer_image" "$context" > "$logdir/build-trainer.log" 2>&1 \
  || { tail -n 30 "$logdir/build-trainer.log" >&2; die "trainer image build failed (log above)"; }
if ! docker run --rm --network none --entrypoint test "$trainer_image" -f "$trainer"; then
  die "$trainer is not in the trainer image (examples/diloco_train.py missing from the tree? --standin runs the plumbing with a stand-in)"
fi
phase images

# -- cluster ------------------------------------------------------------------
# Mutual TLS, as in production: a fresh CA and a certificate per service, made
# by the image's own `collnet certs`; the services run as uid 10001, so their
# keys are handed to it (still 0600). The CA key never leaves this directory.
secret_dir="$(mktemp -d)"
certs() {
  docker run --rm --network none --user 0 -v "$secret_dir:/tls" "$image" collnet certs "$@" \
    >> "$logdir/certs.log" 2>&1 || { tail -n 20 "$logdir/certs.log" >&2; die "collnet certs $* failed"; }
}
certs ca --out /tls
for name in coordinator peer1 peer2 peer3 peer4; do
  certs issue --ca /tls --name "$name" --out /tls
done
chown 10001 "$secret_dir"/coordinator.key "$secret_dir"/peer?.key
export COLLNET_TLS_DIR_HOST="$secret_dir"
export COLLNET_IMAGE="$image" COLLNET_TRAINER_IMAGE="$trainer_image" COLLNET_TRAINER="$trainer"
export COLLNET_RESTART=no OUTER_STEPS=1000000 INNER_STEPS="${CHURN_INNER_STEPS:-10}"

say "starting the cluster (project $project)"
"${compose[@]}" up -d --no-build > "$logdir/up.log" 2>&1 \
  || { tail -n 30 "$logdir/up.log" >&2; die "docker-compose up failed (log above)"; }
phase cluster-up

rounds=2
[ "$short" = 1 ] && rounds=1
# In the background and waited for, so a TERM/INT reaches the cleanup trap at once.
python3 "$repo/deploy/churn/churn.py" \
  --project "$project" --network "${project}_collnet" --image "$image" \
  --compose "docker-compose -f $repo/deploy/docker-compose.yml" \
  --bound-s "${CHURN_BOUND_S:-30}" --join-bound-s "${CHURN_JOIN_BOUND_S:-90}" --rounds "$rounds" \
  --json-out "$logdir/summary.json" > >(tee "$logdir/churn.log") 2>&1 &
churn_pid=$!
result=0
wait "$churn_pid" || result=$?
churn_pid=""
phase churn

echo "== timings: ${phase_times[*]} total=$(( SECONDS - t_start ))s"
exit "$result"

#!/usr/bin/env bash
# Entry point of the collnet image: turns COLLNET_* settings into a command line.
#
#   collnet-entrypoint coordinator   collnet coordinator from the settings below
#   collnet-entrypoint daemon        collnet daemon from the settings below
#   collnet-entrypoint healthcheck   exit 0 when this container's role answers
#   collnet-entrypoint CMD ...       run CMD as is (python, collnet up, bash, ...)
#
# Settings come from the environment, else from $COLLNET_CONFIG (default
# /etc/collnet/collnet.conf): KEY=VALUE lines with the same names, '#'
# comments; the file is parsed, never sourced. Extra flags for the collnet
# subcommand can follow the role: `daemon --connections 8`.
#
#   COLLNET_LISTEN            HOST:PORT to listen on (coordinator 0.0.0.0:29400,
#                             daemon data links 0.0.0.0:29500)
#   COLLNET_COORDINATOR       daemon: coordinator HOST:PORT (required)
#   COLLNET_IPC               daemon: local API address (ipc:///run/collnet/daemon.sock)
#   COLLNET_IPC_GROUP, COLLNET_IPC_TCP_PORT, COLLNET_IPC_TOKEN_FILE   daemon: who may use
#                             the local API (read by collnet itself; default: uid 10001 only,
#                             no TCP fallback; see docs/operations.md)
#   COLLNET_ADVERTISE_HOST    daemon: host other daemons dial (default: this container's IP)
#   COLLNET_PEER_ID           daemon: stable peer id (default: the TLS certificate's
#                             name with TLS, else the container hostname)
#   COLLNET_CONNECTIONS, COLLNET_CHUNK_BYTES, COLLNET_CONNECT_TIMEOUT_S
#   COLLNET_HEARTBEAT_INTERVAL_S, COLLNET_HEARTBEAT_FLOOR_S, COLLNET_HEARTBEAT_CEILING_S
#   COLLNET_REJOIN_GRACE_S    coordinator only
#   COLLNET_LEAVE_WHEN_TRAINERS_EXIT  daemon: 1 passes --leave-when-trainers-exit
#   COLLNET_METRICS_PORT, COLLNET_METRICS_HOST   Prometheus endpoint (read by collnet itself)
#   COLLNET_TLS_CA, COLLNET_TLS_CERT, COLLNET_TLS_KEY   mutual TLS (read by collnet
#                             itself; default /run/secrets/collnet_tls_{ca,cert,key}
#                             when those exist)
#   COLLNET_SECRET_FILE       shared secret file, for trusted networks: plaintext after
#                             the handshake (read by collnet itself; default
#                             /run/secrets/collnet_secret when that exists)
#   COLLNET_LOG_LEVEL, COLLNET_LOG_JSON (1/true)
#   COLLNET_EXTRA_ARGS        more flags for the subcommand (split on spaces)
set -euo pipefail

role_file=/tmp/collnet.role

die() { echo "collnet-entrypoint: error: $*" >&2; exit 2; }

load_config() {
  local file="${COLLNET_CONFIG:-/etc/collnet/collnet.conf}" line key value
  [ -f "$file" ] || return 0
  [ -r "$file" ] || die "config file $file is not readable by uid $(id -u)"
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"          # trim leading space
    case "$line" in ''|'#'*) continue ;; esac
    [[ "$line" =~ ^(export[[:space:]]+)?(COLLNET_[A-Z0-9_]+)=(.*)$ ]] \
      || die "$file: not a COLLNET_KEY=VALUE line: $line"
    key="${BASH_REMATCH[2]}"
    value="${BASH_REMATCH[3]}"
    value="${value%"${value##*[![:space:]]}"}"         # trim trailing space
    case "$value" in \"*\"|\'*\') value="${value:1:${#value}-2}" ;; esac
    # The environment wins over the file.
    if [ -z "${!key+x}" ]; then export "$key=$value"; fi
  done < "$file"
}

truthy() { case "${1:-}" in 1|true|TRUE|yes|on) return 0 ;; *) return 1 ;; esac; }

container_ip() {
  local ip
  ip="$(hostname -i 2>/dev/null | awk '{print $1}')" || true
  echo "${ip:-127.0.0.1}"
}

check_secret() {
  if [ -z "${COLLNET_SECRET_FILE:-}" ] && [ -f /run/secrets/collnet_secret ]; then
    export COLLNET_SECRET_FILE=/run/secrets/collnet_secret
  fi
  if [ -n "${COLLNET_SECRET_FILE:-}" ] && [ ! -r "$COLLNET_SECRET_FILE" ]; then
    die "secret file $COLLNET_SECRET_FILE is missing or not readable by uid $(id -u) (make it readable by uid or gid 10001)"
  fi
}

check_tls() {
  local part var path
  for part in ca cert key; do
    var="COLLNET_TLS_${part^^}"
    if [ -z "${!var:-}" ] && [ -f "/run/secrets/collnet_tls_$part" ]; then
      export "$var=/run/secrets/collnet_tls_$part"
    fi
    path="${!var:-}"
    if [ -n "$path" ] && [ ! -r "$path" ]; then
      die "TLS file $path ($var) is missing or not readable by uid $(id -u) (chown it to 10001; keep keys 0600)"
    fi
  done
}

global_flags=()
set_global_flags() {
  global_flags=(--log-level "${COLLNET_LOG_LEVEL:-info}")
  if truthy "${COLLNET_LOG_JSON:-}"; then global_flags+=(--log-json); fi
}

# --flag VALUE for every setting that is set.
opt() {
  local flag="$1" value="${2:-}"
  if [ -n "$value" ]; then cmd+=("$flag" "$value"); fi
}

extra_args() {
  local -a extra=()
  if [ -n "${COLLNET_EXTRA_ARGS:-}" ]; then
    read -r -a extra <<< "$COLLNET_EXTRA_ARGS"
    cmd+=("${extra[@]}")
  fi
}

heartbeat_opts() {
  opt --heartbeat-interval-s "${COLLNET_HEARTBEAT_INTERVAL_S:-}"
  opt --heartbeat-floor-s "${COLLNET_HEARTBEAT_FLOOR_S:-}"
  opt --heartbeat-ceiling-s "${COLLNET_HEARTBEAT_CEILING_S:-}"
}

run_coordinator() {
  cmd=(collnet "${global_flags[@]}" coordinator --listen "${COLLNET_LISTEN:-0.0.0.0:29400}")
  heartbeat_opts
  opt --rejoin-grace-s "${COLLNET_REJOIN_GRACE_S:-}"
  extra_args
  echo coordinator > "$role_file"
  echo "collnet-entrypoint: ${cmd[*]} $*" >&2
  exec "${cmd[@]}" "$@"
}

run_daemon() {
  [ -n "${COLLNET_COORDINATOR:-}" ] || die "COLLNET_COORDINATOR (HOST:PORT of the coordinator) is not set"
  local ipc="${COLLNET_IPC:-ipc:///run/collnet/daemon.sock}"
  cmd=(collnet "${global_flags[@]}" daemon
       --coordinator "$COLLNET_COORDINATOR"
       --ipc "$ipc"
       --listen "${COLLNET_LISTEN:-0.0.0.0:29500}"
       --advertise-host "${COLLNET_ADVERTISE_HOST:-$(container_ip)}")
  # With TLS the peer id is the certificate's name (collnet checks a given one).
  if [ -n "${COLLNET_PEER_ID:-}" ] || [ -z "${COLLNET_TLS_CERT:-}" ]; then
    cmd+=(--peer-id "${COLLNET_PEER_ID:-$(hostname)}")
  fi
  opt --connections "${COLLNET_CONNECTIONS:-}"
  opt --chunk-bytes "${COLLNET_CHUNK_BYTES:-}"
  opt --connect-timeout-s "${COLLNET_CONNECT_TIMEOUT_S:-}"
  heartbeat_opts
  if truthy "${COLLNET_LEAVE_WHEN_TRAINERS_EXIT:-}"; then cmd+=(--leave-when-trainers-exit); fi
  extra_args
  printf 'daemon %s\n' "$ipc" > "$role_file"
  echo "collnet-entrypoint: ${cmd[*]} $*" >&2
  exec "${cmd[@]}" "$@"
}

# Listening on PORT, read from /proc (no connection, so no handshake noise in the logs).
listening_on() {
  local port_hex
  port_hex="$(printf '%04X' "$1")"
  awk -v p=":$port_hex" '$4 == "0A" && substr($2, length($2) - 4) == p {found = 1} END {exit !found}' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

healthcheck() {
  [ -f "$role_file" ] || exit 0   # not a collnet service container
  local role ipc
  read -r role ipc < "$role_file"
  case "$role" in
    coordinator)
      local listen="${COLLNET_LISTEN:-0.0.0.0:29400}"
      listening_on "${listen##*:}" || { echo "coordinator not listening on $listen"; exit 1; }
      ;;
    daemon)
      # A hello over the local API: the daemon's event loop answers.
      exec timeout 7 python3 -c '
import sys
import collnet_client
try:
    with collnet_client.connect(sys.argv[1], timeout_s=5.0) as comm:
        print("daemon", comm.peer_id, "epoch", comm.epoch)
except collnet_client.CollnetError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
' "$ipc"
      ;;
  esac
}

load_config
set_global_flags
case "${1:-daemon}" in
  coordinator) shift; check_secret; check_tls; run_coordinator "$@" ;;
  daemon) shift || true; check_secret; check_tls; run_daemon "$@" ;;
  healthcheck) healthcheck ;;
  *) check_secret; check_tls; exec "$@" ;;
esac

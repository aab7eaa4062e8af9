#!/usr/bin/env bash
# Prepare this machine for the Personal Health Train demo and tests: system packages, the Python
# venv, a docker engine without bridge networking, a local image registry, and the images.
# Safe to run again at any time; it only does what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
LOGS="$LOCAL/logs"
VENV="$ROOT/.venv"
REGISTRY_ADDR="${PHT_IMAGE_REGISTRY:-127.0.0.1:5050}"
REGISTRY_DIR="$LOCAL/image-registry"

SYSTEM_PACKAGES=(docker.io docker-registry debootstrap postgresql age python3-venv debian-archive-keyring)
# Daemons and debootstrap live in sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "setup: $*"; }
fail() { echo "setup: $*" >&2; exit 1; }

missing_system_tools() {
    local tool
    for tool in dockerd docker-registry debootstrap pg_ctlcluster age python3; do
        command -v "$tool" >/dev/null || echo "$tool"
    done
    # Debian splits venv support out of python3; without it `python3 -m venv` fails.
    if command -v python3 >/dev/null && ! python3 -c "import ensurepip, venv" 2>/dev/null; then
        echo "python3-venv"
    fi
    # Debootstrapping bookworm needs Debian's signing keys (not present on Ubuntu by default).
    [[ -e /usr/share/keyrings/debian-archive-keyring.gpg ]] || echo "debian-archive-keyring"
}

install_system_packages() {
    local missing
    missing="$(missing_system_tools | tr '\n' ' ')"
    if [[ -z "$missing" ]]; then
        say "system packages already installed"
        return
    fi
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        fail "missing ${missing% }; install the packages ${SYSTEM_PACKAGES[*]} as root (apt-get install), then rerun"
    fi
    say "installing ${SYSTEM_PACKAGES[*]} (missing: ${missing% })"
    # Stop apt from starting the packaged services with their defaults: Debian's dockerd would
    # create the docker0 bridge, docker-registry would listen on all interfaces. We start our own.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${SYSTEM_PACKAGES[@]}"
    # Same reason at boot time: a socket-activated docker.service would come up with a bridge.
    if [[ -d /run/systemd/system ]]; then
        local unit
        for unit in docker.socket docker.service docker-registry.service; do
            if systemctl cat "$unit" >/dev/null 2>&1; then
                systemctl disable --now "$unit"
            fi
        done
    fi
}

prepare_python() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating $VENV"
        python3 -m venv "$VENV"
    fi
    local wanted installed
    wanted="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
    installed="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
    if [[ "$wanted" == "$installed" ]]; then
        say "python packages already match requirements.txt"
        return
    fi
    say "installing requirements.txt into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
    echo "$wanted" >"$VENV/.requirements.sha256"
}

engine_answers() {
    "$VENV/bin/python" -c "import docker; docker.from_env(timeout=3).ping()" >/dev/null 2>&1
}

registry_answers() {
    "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://$REGISTRY_ADDR/v2/', timeout=2)" \
        >/dev/null 2>&1
}

# wait_for SECONDS CHECK: true once CHECK succeeds, false if it never does within SECONDS.
wait_for() {
    local seconds=$1 check=$2 i
    for ((i = 0; i < seconds; i++)); do
        "$check" && return 0
        sleep 1
    done
    "$check"
}

# Start a daemon in its own session so it outlives this script and the terminal.
start_detached() {
    local log=$1
    shift
    setsid nohup "$@" >>"$log" 2>&1 </dev/null &
}

start_docker_engine() {
    if engine_answers; then
        say "docker engine already running"
        return
    fi
    [[ $EUID -eq 0 ]] || fail "docker engine not running; start it as root: dockerd --bridge=none --iptables=false"
    say "starting dockerd (log: $LOGS/dockerd.log)"
    # No bridge and no iptables rules: containers get network none or host only.
    start_detached "$LOGS/dockerd.log" dockerd --bridge=none --iptables=false
    wait_for 60 engine_answers || {
        tail -n 20 "$LOGS/dockerd.log" >&2
        fail "dockerd did not answer within 60 s; see the log above ($LOGS/dockerd.log)"
    }
    say "docker engine running"
}

start_image_registry() {
    if registry_answers; then
        say "image registry already running at $REGISTRY_ADDR"
        return
    fi
    mkdir -p "$REGISTRY_DIR/data"
    cat >"$REGISTRY_DIR/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: "$REGISTRY_DIR/data"
  delete:
    enabled: true
http:
  addr: "$REGISTRY_ADDR"
EOF
    say "starting docker-registry at $REGISTRY_ADDR (log: $LOGS/image-registry.log)"
    start_detached "$LOGS/image-registry.log" docker-registry serve "$REGISTRY_DIR/config.yml"
    wait_for 30 registry_answers || {
        tail -n 20 "$LOGS/image-registry.log" >&2
        fail "docker-registry did not answer at http://$REGISTRY_ADDR/v2/ within 30 s; see the log above"
    }
    say "image registry running at $REGISTRY_ADDR"
}

mkdir -p "$LOGS"
install_system_packages
prepare_python
start_docker_engine
start_image_registry
PHT_IMAGE_REGISTRY="$REGISTRY_ADDR" "$VENV/bin/python" "$ROOT/scripts/images.py"
say "done"

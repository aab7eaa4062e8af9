#!/usr/bin/env bash
# Prepare this machine for the Personal Health Train demo and tests: system packages, the Python
# venv, a docker engine without bridge networking, a local image registry that only lets its one
# account in (the engine's clients are logged in with it), and the images.
# Safe to run again at any time; it only does what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
LOGS="$LOCAL/logs"
VENV="$ROOT/.venv"
REGISTRY_ADDR="${PHT_IMAGE_REGISTRY:-127.0.0.1:5050}"
REGISTRY_DIR="$LOCAL/image-registry"
REGISTRY_CONFIG="$REGISTRY_DIR/config.yml"
# The registry's one account as user:password, readable by its owner only (scripts/images.py reads
# it too), and its bcrypt hash, which is all the registry gets.
REGISTRY_CREDENTIALS="$REGISTRY_DIR/push-credentials"
REGISTRY_HTPASSWD="$REGISTRY_DIR/htpasswd"
REGISTRY_USER="pht-images"
# The Python helpers below (scripts/images.py) read the registry's address from here.
export PHT_IMAGE_REGISTRY="$REGISTRY_ADDR"

# e2fsprogs: the site runner holds algorithms to their disk limits with small ext4 filesystems.
# haproxy: the balancer in front of the registry's replicas in tests and benchmarks (scripts/balancer.py).
# openssl: the tests make a consortium's private CA and the registry's certificate with it (tests/test_tls.py).
# chromium: the dashboard's browser tests drive it with Playwright (tests/browser.py); Playwright never
# downloads a browser of its own.
SYSTEM_PACKAGES=(docker.io docker-registry apache2-utils debootstrap postgresql age python3-venv
    debian-archive-keyring e2fsprogs haproxy openssl chromium)
# Daemons and debootstrap live in sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "setup: $*"; }
fail() { echo "setup: $*" >&2; exit 1; }

missing_system_tools() {
    local tool
    for tool in dockerd docker docker-registry htpasswd debootstrap pg_ctlcluster age python3 mkfs.ext4 \
        haproxy openssl chromium; do
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
        for unit in docker.socket docker.service docker-registry.service haproxy.service; do
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
    wanted="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    installed="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
    if [[ "$wanted" == "$installed" ]]; then
        say "python packages already match requirements.txt and pyproject.toml"
        return
    fi
    say "installing requirements.txt, and this checkout as a package (pht, pht-registry, pht-site, pht-fileservice)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
    # Editable: the commands run this checkout's code, as python master/TaskMaster.py and the others do.
    # The pins above already hold every dependency, so nothing else is resolved here.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --editable "$ROOT"
    echo "$wanted" >"$VENV/.requirements.sha256"
}

engine_answers() {
    "$VENV/bin/python" -c "import docker; docker.from_env(timeout=3).ping()" >/dev/null 2>&1
}

# registry_status anonymous|engine|ours: the HTTP status of the registry's GET /v2/ without
# credentials, with the engine's login (what `docker login` stored) or with $REGISTRY_CREDENTIALS;
# 000 when nothing answers. 200 lets the caller in, 401 asks for (other) credentials.
registry_status() {
    (cd "$ROOT" && "$VENV/bin/python" - "$1" <<'EOF'
import sys
from scripts import images
credentials = {"anonymous": None, "engine": images.engine_login(), "ours": images.local_credentials()}[sys.argv[1]]
print(images.registry_status(credentials) or "000")
EOF
    )
}

registry_answers() {
    [[ "$(registry_status anonymous)" != 000 ]]
}

# wait_for SECONDS CHECK [ARGS...]: true once CHECK succeeds (tried about ten times a second), false
# if it never does within SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
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

# The account is made once; a concurrent run that made it first wins, so both log in with the same.
prepare_registry_credentials() {
    mkdir -p "$REGISTRY_DIR/data"
    if [[ ! -s "$REGISTRY_CREDENTIALS" ]]; then
        say "making the image registry's account ($REGISTRY_CREDENTIALS)"
        local made="$REGISTRY_CREDENTIALS.$$"
        (umask 077 &&
            "$VENV/bin/python" -c 'import secrets, sys; print(f"{sys.argv[1]}:{secrets.token_hex(32)}")' \
                "$REGISTRY_USER" >"$made")
        # A hard link never replaces an existing file, unlike mv.
        ln "$made" "$REGISTRY_CREDENTIALS" 2>/dev/null || true
        rm -f "$made"
    fi
    if [[ ! -s "$REGISTRY_HTPASSWD" || "$REGISTRY_CREDENTIALS" -nt "$REGISTRY_HTPASSWD" ]]; then
        local user password
        IFS=: read -r user password <"$REGISTRY_CREDENTIALS"
        # bcrypt (-B) is the only hash the registry accepts; the password goes through stdin (-i),
        # never on a command line where ps would show it.
        (umask 077 && printf '%s\n' "$password" | htpasswd -niB "$user" >"$REGISTRY_HTPASSWD.$$")
        mv "$REGISTRY_HTPASSWD.$$" "$REGISTRY_HTPASSWD"
    fi
}

write_registry_config() {
    cat >"$REGISTRY_CONFIG" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: "$REGISTRY_DIR/data"
  delete:
    enabled: true
# Every request, pulls included, needs the account: without it an algorithm on a site's host
# network could push over a trusted tag, and the next task for that tag would run its image.
auth:
  htpasswd:
    realm: pht-image-registry
    path: "$REGISTRY_HTPASSWD"
http:
  addr: "$REGISTRY_ADDR"
EOF
}

# The pid of the docker-registry started from $REGISTRY_CONFIG (by this or an earlier run), if that
# config is for $REGISTRY_ADDR; else nothing: a registry started any other way is not this script's
# to restart. The config is only written when a registry is started, so it is the running one's.
our_registry_pid() {
    grep -qF "addr: \"$REGISTRY_ADDR\"" "$REGISTRY_CONFIG" 2>/dev/null || return 0
    local proc command_line
    for proc in /proc/[0-9]*; do
        command_line="$(tr '\0' ' ' 2>/dev/null <"$proc/cmdline")" || continue
        if [[ "$command_line" == "docker-registry serve $REGISTRY_CONFIG " ]]; then
            echo "${proc#/proc/}"
            return
        fi
    done
}

launch_image_registry() {
    say "starting docker-registry at $REGISTRY_ADDR with authentication (log: $LOGS/image-registry.log)"
    write_registry_config
    start_detached "$LOGS/image-registry.log" docker-registry serve "$REGISTRY_CONFIG"
    wait_for 30 registry_answers || {
        tail -n 20 "$LOGS/image-registry.log" >&2
        fail "docker-registry did not answer at http://$REGISTRY_ADDR/v2/ within 30 s; see the log above"
    }
}

process_gone() {
    ! kill -0 "$1" 2>/dev/null
}

restart_image_registry() {
    local pid=$1
    say "restarting docker-registry (pid $pid) with authentication"
    kill -TERM "$pid"
    wait_for 20 process_gone "$pid" ||
        fail "docker-registry (pid $pid) did not stop within 20 s; stop it (kill -KILL $pid) and rerun"
    launch_image_registry
}

# The engine's clients (the docker CLI, docker-py in the site runner, scripts/images.py and the
# tests) read the login from ~/.docker/config.json of the user running them, and send it to the
# registry themselves. Algorithms never get it: their containers run with no network, an
# unprivileged user and only the run's own folders mounted, and no host file or variable reaches
# them (tests/test_image_registry_auth.py checks this).
log_engine_in() {
    local user password
    IFS=: read -r user password <"$REGISTRY_CREDENTIALS"
    say "logging the docker engine's clients in to $REGISTRY_ADDR as $user"
    # Its output only matters when it fails (otherwise a warning that the login is stored unencrypted,
    # in a file only this user can read).
    local output
    output="$(printf '%s\n' "$password" |
        docker login "$REGISTRY_ADDR" --username "$user" --password-stdin 2>&1)" || {
        echo "$output" >&2
        fail "docker login $REGISTRY_ADDR failed; see the message above"
    }
}

# Start the image registry with authentication, or bring a running one to it, and log the engine in.
start_image_registry() {
    prepare_registry_credentials
    local status pid
    status="$(registry_status anonymous)"
    case "$status" in
        000)
            launch_image_registry
            ;;
        200)
            pid="$(our_registry_pid)"
            [[ -n "$pid" ]] || fail "the image registry at $REGISTRY_ADDR lets anyone push, and it was not started" \
                "from $REGISTRY_CONFIG; stop it and rerun, and this script starts one with authentication"
            # Other users may be pulling from it right now. A login to a registry without
            # authentication succeeds and stores the account, so logging in before the restart lets
            # their pulls carry on after it (docker-py reads the login when a client starts, and
            # again on each pull while it has none).
            log_engine_in
            restart_image_registry "$pid"
            ;;
        401) ;;
        *)
            fail "http://$REGISTRY_ADDR/v2/ answered HTTP $status, not as a docker-registry does; stop what" \
                "listens there, or set PHT_IMAGE_REGISTRY to another address"
            ;;
    esac
    if [[ "$(registry_status ours)" != 200 ]]; then
        # docker-registry rereads its htpasswd file, so this is a registry started some other way.
        [[ "$(registry_status engine)" == 200 ]] || fail "the image registry at $REGISTRY_ADDR refuses both" \
            "the account in $REGISTRY_CREDENTIALS and the engine's login; log in to it (docker login" \
            "$REGISTRY_ADDR), or stop it and rerun"
        say "image registry at $REGISTRY_ADDR takes the engine's login, not the account in" \
            "$REGISTRY_CREDENTIALS (another checkout's?); using it as it is"
        return
    fi
    if [[ "$(registry_status engine)" != 200 ]]; then
        log_engine_in
    fi
    say "image registry running at $REGISTRY_ADDR with authentication; the engine is logged in"
}

mkdir -p "$LOGS"
install_system_packages
prepare_python
start_docker_engine
start_image_registry
"$VENV/bin/python" "$ROOT/scripts/images.py"
say "done"

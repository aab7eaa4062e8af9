#!/usr/bin/env bash
# Start a project-local PostgreSQL server on loopback for the registry's tests (idempotent).
# Prints the SQLAlchemy URL of its test database on the last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${PHT_POSTGRES_PORT:-5433}"
DATA="$ROOT/.local/postgres/data"
LOG="$ROOT/.local/logs/postgres.log"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[[ -x "$BIN/initdb" ]] || { echo "postgres: PostgreSQL is not installed; run scripts/setup.sh" >&2; exit 1; }

# initdb and the server refuse to run as root: use Debian's postgres account then.
as_owner() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

mkdir -p "$(dirname "$DATA")" "$(dirname "$LOG")"
if [[ ! -s "$DATA/PG_VERSION" ]]; then
    echo "postgres: creating a cluster in $DATA" >&2
    mkdir -p "$DATA"
    [[ $EUID -ne 0 ]] || chown postgres: "$DATA" "$(dirname "$DATA")"
    as_owner "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi
[[ $EUID -ne 0 ]] || { touch "$LOG"; chown postgres: "$LOG"; }
if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    echo "postgres: starting on 127.0.0.1:$PORT (log: $LOG)" >&2
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-h 127.0.0.1 -p $PORT -k $DATA" start >/dev/null
fi
if ! "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='pht_test'" | grep -q 1; then
    "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qc "CREATE DATABASE pht_test"
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/pht_test"

#!/usr/bin/env bash
# README command 2: prepare this machine, then run the whole test suite against the real parts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
PHT_TEST_DATABASE_URL="$(bash "$ROOT/scripts/postgres.sh" | tail -n 1)"
export PHT_TEST_DATABASE_URL
PHT_TEST_S3_URL="$(bash "$ROOT/scripts/seaweedfs.sh" | tail -n 1)"
export PHT_TEST_S3_URL
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Set up a virtualenv with the project and its test extra, then run the whole test suite.
# Used as-is by the README and by .ci/run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GPU_SHARE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[test] installing jupyter-gpu-share[test] (editable)"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"

# A throwaway PostgreSQL on loopback for the store's PostgreSQL tests, when the server is installed.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "${GPU_SHARE_TEST_DB_URL:-}" ] && [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ]; then
  PGDATA=$(mktemp -d /tmp/gpu-share-pg.XXXXXX)
  PGPORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  RUN_AS=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$PGDATA"
    RUN_AS=(runuser -u postgres --)
  fi
  "${RUN_AS[@]}" "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust >/dev/null
  "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -o "-k $PGDATA -p $PGPORT -h 127.0.0.1" -l "$PGDATA/log" -w start >/dev/null
  trap '"${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$PGDATA"' EXIT
  export GPU_SHARE_TEST_DB_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
  echo "[test] PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT"
fi

echo "[test] running pytest"
"$VENV/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the store tests and print its URL on the last line.
#
# Usage:  export HEMASCRIBE_TEST_PG_URL="$(.ci/start_postgres.sh | tail -n 1)"
# Stop:   the data dir and a stop command are printed to stderr.
# As root (CI containers) the server runs as the `postgres` user; as another user it runs as
# that user and apt-get goes through sudo.
set -euo pipefail

log() { echo "[start_postgres] $*" >&2; }

find_initdb() {
    # Prefer the versioned Debian binaries; newest version wins.
    ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ -z "$(find_initdb)" ]; then
    log "PostgreSQL server binaries missing; installing the Debian package"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
INITDB="$(find_initdb)"
[ -n "$INITDB" ] || { log "initdb not found after install"; exit 1; }
BIN="$(dirname "$INITDB")"

if [ "$(id -u)" -eq 0 ]; then
    # The server refuses to run as root, so everything runs as the postgres system user.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /bin/bash postgres
    as_pg() { su postgres -s /bin/bash -c "$*"; }
else
    as_pg() { bash -c "$*"; }
fi

# A free loopback port: ask the kernel for one (tiny race window, acceptable for CI).
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

DATA="$(mktemp -d /tmp/hemascribe-pg.XXXXXX)"
[ "$(id -u)" -ne 0 ] || chown postgres: "$DATA"
chmod 700 "$DATA"

log "initdb in $DATA (port $PORT)"
# trust auth: a password-less throwaway cluster reachable only on 127.0.0.1 and a socket in /tmp.
as_pg "'$BIN/initdb' -D '$DATA/data' -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >'$DATA/initdb.log' 2>&1" \
    || as_pg "'$BIN/initdb' -D '$DATA/data' -U postgres --auth=trust -E UTF8 --locale=C >'$DATA/initdb.log' 2>&1"
# fsync stays on (default): the crash-safety tests should see real durability.
as_pg "'$BIN/pg_ctl' -D '$DATA/data' -l '$DATA/server.log' -w -t 60 -o \"-k /tmp -p $PORT -h 127.0.0.1\" start" >&2

as_pg "'$BIN/psql' -h 127.0.0.1 -p $PORT -U postgres -d postgres -v ON_ERROR_STOP=1 -qc 'CREATE DATABASE hemascribe_test'" >&2

log "running; stop with: $BIN/pg_ctl -D $DATA/data stop -m fast (as the user that started it), then rm -rf $DATA"
echo "postgresql+psycopg2://postgres@127.0.0.1:${PORT}/hemascribe_test"

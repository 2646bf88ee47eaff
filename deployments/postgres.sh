#!/usr/bin/env bash
# A local PostgreSQL for the Prefect server (Debian's postgresql package), in a folder of its own.
#   deployments/postgres.sh start DIR   initialise DIR once, start the server on a free port, and print the
#                                       shell lines that point Prefect at it (eval them):
#                                       PREFECT_API_DATABASE_CONNECTION_URL=..., PGSTOP=...
#   deployments/postgres.sh stop DIR
# Runs the database as the `postgres` user when started as root (PostgreSQL refuses to run as root).
# RECAST_POSTGRES_BIN: another PostgreSQL's bin folder (initdb, pg_ctl, createdb), e.g. Debian's package copied
# where it cannot be installed (share/ where Debian puts it relative to bin/; a libs/ folder beside bin/ holds
# the shared libraries that machine lacks).
set -euo pipefail
cmd=${1:?start or stop}; dir=${2:?the cluster folder}
bin=${RECAST_POSTGRES_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$bin/initdb" ] || { echo "PostgreSQL is not installed: apt-get install postgresql" \
  "(or RECAST_POSTGRES_BIN=<a folder holding initdb and pg_ctl>; it is '${RECAST_POSTGRES_BIN:-unset}')" >&2; exit 1; }
if [ "$(id -u)" = 0 ] && ! id postgres > /dev/null 2>&1; then
  echo "running as root, PostgreSQL needs a 'postgres' user to run as: useradd --system postgres" >&2; exit 1
fi
libs=()
[ -d "$bin/../libs" ] && libs=(env "LD_LIBRARY_PATH=$(cd "$bin/../libs" && pwd)")
as_db() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "${libs[@]}" "$@"; else "${libs[@]}" "$@"; fi; }
as_db test -x "$bin/postgres" || { echo "the postgres user cannot run $bin/postgres (a folder above it is" \
  "closed to other users): put PostgreSQL where it can" >&2; exit 1; }
mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres "$dir"
if [ "$cmd" = stop ]; then as_db "$bin/pg_ctl" -D "$dir/data" -m fast stop > /dev/null; exit 0; fi
if [ ! -f "$dir/data/PG_VERSION" ]; then
  as_db "$bin/initdb" -D "$dir/data" -U postgres --auth=trust > "$dir/initdb.log" 2>&1
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_db "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start > /dev/null
as_db "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres prefect 2>/dev/null || true
echo "export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://postgres@127.0.0.1:$port/prefect"
echo "PGSTOP='$0 stop $dir'"

# shellcheck shell=bash
#
# PostgreSQL bootstrap for scripts/test and scripts/demo (source this file).
#
#   pg_ensure   makes sure psql and python3 are there, and leaves an exported
#               DATABASE_URL pointing at a server where we are superuser:
#                 - DATABASE_URL already set: used as is (checked with psql);
#                 - otherwise a THROWAWAY cluster is started (initdb in a fresh temp
#                   dir, 127.0.0.1 on a free port from 55432 up, no durability) and
#                   stopped and removed when the calling script exits.
#               The server on the default port 5432 is never used implicitly.
#   pg_keep     leave the throwaway cluster running when the script exits.
#   pg_cleanup  stop and remove the throwaway cluster now (the EXIT trap calls it).
#
# Server binaries come from `pg_config --bindir`, else the newest
# /usr/lib/postgresql/*/bin, else initdb on PATH; when none exist and we are root on
# a Debian-like system, `apt-get install postgresql` provides them (and psql).
# As root the cluster runs as the unprivileged user `nobody` (PostgreSQL refuses
# to run as root).

PG_THROWAWAY_DIR=""
PG_THROWAWAY_BINDIR=""
_PG_RUN_USER=""

pg_log() { printf 'pg: %s\n' "$*" >&2; }

_pg_fail() {
    pg_log "error: $*"
    exit 1
}

_pg_is_root() { [ "$(id -u)" = 0 ]; }

# apt-get install as root on Debian-like systems; returns 1 when that is impossible.
_pg_apt_install() {
    _pg_is_root || return 1
    command -v apt-get >/dev/null 2>&1 || return 1
    pg_log "installing $* with apt-get (this takes a minute) ..."
    apt-get update -qq >&2 || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 || return 1
}

# TLS for the throwaway cluster: a self-signed CA and a server certificate for
# DNS:localhost (not for 127.0.0.1, so tests can check that verify-full checks the
# host name). Exports PROJECTIONIST_TEST_SSLROOTCERT for the TLS tests. Skipped,
# with a note, when openssl cannot be had.
_pg_tls() {
    local dir=$1 tls=$1/tls
    if ! command -v openssl >/dev/null 2>&1; then
        _pg_apt_install openssl || true
        command -v openssl >/dev/null 2>&1 || { pg_log "no openssl: the cluster runs without TLS (the TLS tests are skipped)"; return 0; }
    fi
    mkdir -p "$tls"
    (
        cd "$tls"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=projectionist test CA" \
            -keyout ca.key -out ca.crt >/dev/null 2>&1
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr >/dev/null 2>&1
        printf 'subjectAltName=DNS:localhost\n' >san.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out server.crt >/dev/null 2>&1
        chmod 600 server.key
    ) || { pg_log "could not make test certificates: the cluster runs without TLS"; return 0; }
    if [ -n "${_PG_RUN_USER:-}" ]; then
        chown -R "$_PG_RUN_USER:$(id -g "$_PG_RUN_USER")" "$tls"
    fi
    chmod 755 "$tls"
    chmod 644 "$tls/ca.crt"
    cat >>"$dir/data/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'
EOF
    export PROJECTIONIST_TEST_SSLROOTCERT=$tls/ca.crt
}

# Prints the directory holding initdb, pg_ctl and postgres, or returns 1.
_pg_find_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
            printf '%s\n' "$d"
            return 0
        fi
    fi
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1; then
        d=$(dirname "$(readlink -f "$(command -v initdb)")")
        if [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
            printf '%s\n' "$d"
            return 0
        fi
    fi
    return 1
}

# Runs a command as the cluster's owner (nobody when we are root).
_pg_run() {
    if [ -z "$_PG_RUN_USER" ]; then
        "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$_PG_RUN_USER" --regid="$(id -g "$_PG_RUN_USER")" --clear-groups -- "$@"
    else
        runuser -u "$_PG_RUN_USER" -- "$@"
    fi
}

_pg_port_in_use() {
    # A connect that succeeds means something listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

_pg_ensure_psql() {
    command -v psql >/dev/null 2>&1 && return 0
    if [ -n "$PG_THROWAWAY_BINDIR" ] && [ -x "$PG_THROWAWAY_BINDIR/psql" ]; then
        export PATH="$PATH:$PG_THROWAWAY_BINDIR"
        return 0
    fi
    _pg_apt_install postgresql-client ||
        _pg_fail "psql not found: install the PostgreSQL client (Debian/Ubuntu: apt-get install postgresql-client; macOS: brew install libpq)"
    command -v psql >/dev/null 2>&1 || _pg_fail "psql still not found after installing postgresql-client"
}

_pg_start_throwaway() {
    local bindir version dir port started=0 t0 t1
    t0=$(date +%s%N)
    if ! bindir=$(_pg_find_bindir); then
        _pg_apt_install postgresql ||
            _pg_fail "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found and cannot install them; install the server (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) or set DATABASE_URL to a server where you are superuser"
        bindir=$(_pg_find_bindir) || _pg_fail "PostgreSQL was installed but its server binaries were not found"
    fi
    PG_THROWAWAY_BINDIR=$bindir
    # Tests that need a private cluster (tests/it/harness/cluster.rs) use the same binaries.
    export PROJECTIONIST_TEST_PG_BINDIR=$bindir
    version=$("$bindir/postgres" --version | sed -E 's/.*PostgreSQL\)? *([0-9]+(\.[0-9]+)?).*/\1/')

    if _pg_is_root; then
        _PG_RUN_USER=nobody
        id nobody >/dev/null 2>&1 || _pg_fail "running as root and there is no user 'nobody' to run PostgreSQL as"
        dir=$(mktemp -d /tmp/projectionist-pg.XXXXXX)
        chown "$_PG_RUN_USER:$(id -g "$_PG_RUN_USER")" "$dir"
    else
        dir=$(mktemp -d "${TMPDIR:-/tmp}/projectionist-pg.XXXXXX")
    fi
    PG_THROWAWAY_DIR=$dir
    trap pg_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    (cd "$dir" && _pg_run "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
        --locale=C --no-sync >"$dir/initdb.log" 2>&1) || {
        cat "$dir/initdb.log" >&2
        _pg_fail "initdb failed"
    }
    cat >>"$dir/data/postgresql.conf" <<EOF

# throwaway cluster for projectionist's scripts: speed over durability
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
max_prepared_transactions = 10
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
EOF
    _pg_tls "$dir"

    for port in $(seq 55432 55531); do
        _pg_port_in_use "$port" && continue
        pg_log "starting a throwaway PostgreSQL $version cluster on 127.0.0.1:$port in $dir ..."
        if (cd "$dir" && _pg_run "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port" start >/dev/null 2>&1); then
            started=1
            break
        fi
        # Lost a race for the port to another process: try the next one.
        if grep -qiE 'could not (bind|create listen)|address already in use' "$dir/server.log" 2>/dev/null; then
            : >"$dir/server.log"
            continue
        fi
        cat "$dir/server.log" >&2 || true
        _pg_fail "the throwaway cluster did not start (log above)"
    done
    [ "$started" = 1 ] || _pg_fail "no free port in 55432..55531 for the throwaway cluster"

    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    # pg_ctl -w waited already; pg_isready makes sure TCP answers too.
    if [ -x "$bindir/pg_isready" ]; then
        local _
        for _ in $(seq 1 100); do
            "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres && break
            sleep 0.1
        done
    fi
    t1=$(date +%s%N)
    pg_log "ready in $(( (t1 - t0) / 1000000 )) ms: DATABASE_URL=$DATABASE_URL"
}

pg_cleanup() {
    local dir=$PG_THROWAWAY_DIR
    [ -n "$dir" ] || return 0
    PG_THROWAWAY_DIR=""
    if [ -f "$dir/data/postmaster.pid" ]; then
        (cd "$dir" && _pg_run "$PG_THROWAWAY_BINDIR/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1) || true
    fi
    rm -rf "$dir"
}

# Keep the throwaway cluster after the script exits (prints how to stop it).
pg_keep() {
    [ -n "$PG_THROWAWAY_DIR" ] || return 0
    trap - EXIT INT TERM
    local stop="$PG_THROWAWAY_BINDIR/pg_ctl -D $PG_THROWAWAY_DIR/data -m fast stop && rm -rf $PG_THROWAWAY_DIR"
    if [ -n "$_PG_RUN_USER" ]; then
        stop="(cd $PG_THROWAWAY_DIR && setpriv --reuid=$_PG_RUN_USER --regid=$(id -g "$_PG_RUN_USER") --clear-groups -- $PG_THROWAWAY_BINDIR/pg_ctl -D $PG_THROWAWAY_DIR/data -m fast stop) && rm -rf $PG_THROWAWAY_DIR"
    fi
    pg_log "keeping the throwaway cluster running; stop it with: $stop"
}

# python3 runs the example command projectors and the test consumers.
_pg_ensure_python() {
    command -v python3 >/dev/null 2>&1 && return 0
    _pg_apt_install python3 ||
        _pg_fail "python3 not found (the example command projectors and tests run it): install it (Debian/Ubuntu: apt-get install python3)"
}

pg_ensure() {
    _pg_ensure_python
    local bindir
    if [ -n "${DATABASE_URL:-}" ]; then
        _pg_ensure_psql
        if bindir=$(_pg_find_bindir); then
            export PROJECTIONIST_TEST_PG_BINDIR=$bindir
        fi
        # Never echo the URL itself: it may carry a password.
        psql "$DATABASE_URL" -X -q -t -A -c 'select 1' >/dev/null ||
            _pg_fail "DATABASE_URL is set but the server does not answer (psql -c 'select 1' failed); unset it to use a throwaway cluster"
        pg_log "using the server in DATABASE_URL"
        export DATABASE_URL
        return 0
    fi
    _pg_start_throwaway
    _pg_ensure_psql
    psql "$DATABASE_URL" -X -q -t -A -c 'select 1' >/dev/null || _pg_fail "the throwaway cluster does not answer"
}

#!/usr/bin/env bash
# pg_ctl for the crash tests (pgrx-tests/tests/crash.rs): an immediate shutdown, and a failover
# to a standby. scripts/test.sh points QUOTA_EXT_CRASH_CTL here, with QUOTA_EXT_PG (the version
# in use), QUOTA_EXT_CRASH_DATA (the crash server's data folder) and QUOTA_EXT_CRASH_PORT set.
# Usage: crash_ctl.sh PG_CTL_ARGS...           pg_ctl of the crash server
#        crash_ctl.sh standby-create PORT      a synchronous hot standby of it, started on PORT
#        crash_ctl.sh standby PG_CTL_ARGS...   pg_ctl of that standby (promote, stop)
#        crash_ctl.sh standby-drop             the standby stopped and removed, the crash
#                                              server without its synchronous standby again
. "$(dirname "$0")/lib.sh"
STANDBY="$QUOTA_EXT_CRASH_DATA-standby"
case "${1:-}" in
    standby-create)
        stop_server "$STANDBY" 2>/dev/null || true
        "${SUDO[@]}" rm -rf "$STANDBY"
        as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$QUOTA_EXT_CRASH_PORT" -U postgres -D "$STANDBY" -R -X stream \
            --checkpoint=fast >/dev/null 2>&1
        printf "port = %s\nunix_socket_directories = '%s'\n" "$2" "$STANDBY" | as_pg tee -a "$STANDBY/postgresql.conf" >/dev/null
        pg_ctl_as_pg -D "$STANDBY" -l "$STANDBY/server.log" -w start >/dev/null
        # Commits wait for the standby: what a client saw committed is on it when it takes over.
        pg_psql "$QUOTA_EXT_CRASH_PORT" -d postgres -c "ALTER SYSTEM SET synchronous_standby_names = '*'" \
            -c "SELECT pg_reload_conf()" >/dev/null
        ;;
    standby)
        shift
        pg_ctl_as_pg -D "$STANDBY" -l "$STANDBY/server.log" "$@" >/dev/null
        ;;
    standby-drop)
        stop_server "$STANDBY" 2>/dev/null || true
        "${SUDO[@]}" rm -rf "$STANDBY"
        [ -f "$QUOTA_EXT_CRASH_DATA/postmaster.pid" ] \
            || pg_ctl_as_pg -D "$QUOTA_EXT_CRASH_DATA" -l "$QUOTA_EXT_CRASH_DATA/server.log" -w start >/dev/null
        pg_psql "$QUOTA_EXT_CRASH_PORT" -d postgres -c "ALTER SYSTEM RESET synchronous_standby_names" \
            -c "SELECT pg_reload_conf()" >/dev/null
        ;;
    *)
        pg_ctl_as_pg -D "$QUOTA_EXT_CRASH_DATA" -l "$QUOTA_EXT_CRASH_DATA/server.log" "$@" >/dev/null
        ;;
esac

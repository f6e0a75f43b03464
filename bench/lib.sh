# Shared by the bench scripts: the nginx backends every proxy is put in front of.

# start_backends DIR CORE: one nginx worker pinned to CORE answering "ok" (2
# bytes) on HTTP/1.1 ports 18081-18083 and h2c ports 18181-18183. Its pid file
# is DIR/nginx.pid.
start_backends() {
  local dir=$1 core=$2
  cat > "$dir/backends.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/backends.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:18081; listen 127.0.0.1:18082; listen 127.0.0.1:18083;
           location / { return 200 "ok"; } }
  server { listen 127.0.0.1:18181 http2; listen 127.0.0.1:18182 http2; listen 127.0.0.1:18183 http2;
           location / { return 200 "ok"; } }
}
CONF
  taskset -c "$core" nginx -c "$dir/backends.conf" -p "$dir"
}

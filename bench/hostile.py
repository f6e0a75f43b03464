#!/usr/bin/env python3
"""Hostile clients, side by side: balanced, HAProxy and nginx in front of the
same nginx backend, each proxy pinned to core 0, backend and clients on core 1.

  python3 bench/hostile.py [CLIENTS] [UPLOAD_MB]      (defaults: 300 clients, 4 MB)

0. With IDLE=1 only: CLIENTS keep-alive connections idle after a 2-byte
   answer (what a connection costs by itself). Printed: each proxy's
   resident memory growth (all its processes).
1. Stalled readers: CLIENTS clients with a 4 KiB receive buffer send
   `GET /big HTTP/1.1` (a 50 MB file) and never read. Printed: each proxy's
   resident memory growth after 3 s (run without IDLE=1 to see it alone).
2. Tiny chunks: UPLOAD_MB sent to `POST /sink` as 1-byte chunks (nginx reads
   and discards the body). Printed: each proxy's CPU seconds per MB, the wall
   time, and how many bytes reached the backend (its access log).

BALANCED_BIN=path picks the binary (default target/release/balanced).
Everything runs on loopback; the script stops what it started.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
UPLOAD_MB = int(sys.argv[2]) if len(sys.argv) > 2 else 4
BIN = os.environ.get("BALANCED_BIN", "target/release/balanced")
# IDLE=1: step 0 first (each step's growth counts from the high-water mark
# the one before left, so the two are compared in separate runs).
IDLE = os.environ.get("IDLE") == "1"
BACKEND = 18481
PORTS = {"balanced": 27401, "haproxy": 28401, "nginx": 29401}
CLK = os.sysconf("SC_CLK_TCK")


def pids_of(root):
    """The process and its children (nginx's worker)."""
    out = [root]
    try:
        kids = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_s(pids):
    total = 0.0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read()
            fields = f[f.rfind(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLK
        except OSError:
            pass
    return total


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open")


def main():
    work = tempfile.mkdtemp(prefix="hostile-")
    # nginx's worker runs as nobody: it must read the 50 MB file (else every
    # client gets a 404 and the run measures idle connections).
    os.chmod(work, 0o755)
    procs = []
    try:
        with open(f"{work}/big", "wb") as f:
            f.truncate(50 * 1024 * 1024)
        open(f"{work}/backend.conf", "w").write(f"""
worker_processes 1;
pid {work}/backend.pid;
error_log {work}/backend.log warn;
events {{ worker_connections 8192; }}
http {{
  log_format bytes '$request_length';
  access_log {work}/backend-access.log bytes;
  client_max_body_size 0;
  server {{ listen 127.0.0.1:{BACKEND};
           location /big {{ root {work}; try_files /big =404; }}
           location /sink {{ client_body_buffer_size 1m; proxy_pass http://127.0.0.1:{BACKEND}/ok; }}
           location /ok {{ return 200 "ok"; }} }}
}}
""")
        subprocess.run(["taskset", "-c", "1", "nginx", "-c", f"{work}/backend.conf", "-p", work], check=True)
        open(f"{work}/balanced.yaml", "w").write(f"""
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {{name: hostile}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {BACKEND}}}]
  listeners: [{{name: http, port: {PORTS['balanced']}}}]
  healthCheck: {{protocol: TCP, interval: 1s, timeout: 500ms, rise: 1}}
  limits: {{maxConnections: 9000}}
""")
        open(f"{work}/haproxy.cfg", "w").write(f"""
global
  nbthread 1
  maxconn 9000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend b
backend b
  server s1 127.0.0.1:{BACKEND}
""")
        open(f"{work}/nginx.conf", "w").write(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx.log warn;
events {{ worker_connections 9000; }}
http {{
  access_log off;
  client_max_body_size 0;
  server {{ listen 127.0.0.1:{PORTS['nginx']};
           location / {{ proxy_pass http://127.0.0.1:{BACKEND}; proxy_http_version 1.1;
                        proxy_request_buffering off; }} }}
}}
""")
        env = dict(os.environ, BALANCED_LOG="error")
        b = subprocess.Popen(["taskset", "-c", "0", BIN, "standalone", "-f", f"{work}/balanced.yaml",
                              "--bind", "127.0.0.1", "--admin", "127.0.0.1:27490"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h = subprocess.Popen(["taskset", "-c", "0", "haproxy", "-f", f"{work}/haproxy.cfg", "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs += [b, h]
        subprocess.run(["taskset", "-c", "0", "nginx", "-c", f"{work}/nginx.conf", "-p", work], check=True)
        for port in list(PORTS.values()) + [BACKEND]:
            wait_port(port)
        time.sleep(1.5)  # the first checks pass
        nginx_master = int(open(f"{work}/nginx.pid").read())
        roots = {"balanced": b.pid, "haproxy": h.pid, "nginx": nginx_master}
        os.sched_setaffinity(0, {1})

        def growth(title, connect, settle):
            """Each proxy's RSS growth with CLIENTS sockets from `connect`."""
            print(title)
            for name, port in PORTS.items():
                pids = pids_of(roots[name])
                before = rss_kib(pids)
                socks = [connect(port) for _ in range(CLIENTS)]
                # One client reads its status line (a stalled one then stalls like the rest).
                socks[0].settimeout(5)
                status = socks[0].recv(64).split(b"\r\n")[0].decode(errors="replace")
                time.sleep(settle)
                after = rss_kib(pids)
                print(f"   {name:9} {status:16} {before / 1024:7.1f} MiB -> {after / 1024:7.1f} MiB"
                      f"   growth {(after - before) / 1024:7.1f} MiB")
                for s in socks:
                    s.close()
                time.sleep(1)

        def asking(path, rcvbuf=None):
            def connect(port):
                s = socket.socket()
                if rcvbuf:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.connect(("127.0.0.1", port))
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                return s
            return connect

        if IDLE:
            # The 2-byte answers sit in the sockets unread: the connections are idle.
            growth(f"0. {CLIENTS} keep-alive connections idle after a 2-byte answer: what a connection costs by itself",
                   asking("/ok"), 1)
        growth(f"1. {CLIENTS} clients that never read a 50 MB answer (RSS growth after 3 s)",
               asking("/big", 4096), 3)

        print(f"2. {UPLOAD_MB} MB uploaded as 1-byte chunks to POST /sink")
        for name, port in PORTS.items():
            pids = pids_of(roots[name])
            log = f"{work}/backend-access.log"
            open(log, "w").close()
            os.kill(int(open(f"{work}/backend.pid").read()), signal.SIGUSR1)  # reopen the log
            time.sleep(0.2)
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"1\r\nx\r\n" * 8192
            total = UPLOAD_MB * 1024 * 1024
            c0, t0 = cpu_s(pids), time.time()
            sent = 0
            while sent < total:
                s.sendall(chunk)
                sent += 8192
            s.sendall(b"0\r\n\r\n")
            s.settimeout(120)
            answer = s.recv(200).split(b"\r\n")[0].decode(errors="replace")
            wall = time.time() - t0
            cpu = cpu_s(pids) - c0
            s.close()
            time.sleep(0.3)
            lengths = [int(x) for x in open(log).read().split() if x.isdigit()]
            got = max(lengths) if lengths else 0
            print(f"   {name:9} {answer:16} wall {wall:6.2f} s  CPU {cpu:6.2f} s = {cpu / UPLOAD_MB * 1000:7.1f} ms/MB"
                  f"   request at the backend {got / 1048576:6.1f} MB")
    finally:
        for p in procs:
            p.kill()
        for pid in (f"{work}/nginx.pid", f"{work}/backend.pid"):
            try:
                os.kill(int(open(pid).read()), signal.SIGQUIT)
            except (OSError, ValueError):
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

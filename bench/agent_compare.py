#!/usr/bin/env python3
"""The same HAProxy agent, the same answers, through HAProxy and through
balanced, side by side: `python3 bench/agent_compare.py [target/release/balanced]`.

Two HTTP backends (127.0.0.2 and 127.0.0.3, same port) each with an agent on
the same port of its own address. For each agent answer of backend a (b says
`up 100%` throughout), 600 requests go through each proxy and the shares are
printed: the two should match (weights in proportion, drain and down taking a
out, ready and up bringing it back).
"""

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/balanced"
IPS = ["127.0.0.2", "127.0.0.3"]


def free_port(ips):
    for _ in range(100):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        try:
            for ip in ips[1:]:
                with socket.socket() as t:
                    t.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # health checks close with RST: not an error here


def backend(name, ip, port):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = Server((ip, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Agent(threading.Thread):
    def __init__(self, ip, port, line):
        super().__init__(daemon=True)
        self.line = line
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.start()

    def run(self):
        while True:
            conn, _ = self.sock.accept()
            with conn:
                try:
                    conn.sendall((self.line + "\n").encode())
                except OSError:
                    pass


def shares(port, n=600):
    seen = Counter()
    for _ in range(n):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                seen[r.read().decode()] += 1
        except Exception as e:  # noqa: BLE001
            seen["error"] += 1
    return seen


def main():
    port = free_port(IPS)
    agent_port = free_port(IPS)
    hp_port, bal_port = free_port(["127.0.0.1"]), free_port(["127.0.0.1"])
    admin = free_port(["127.0.0.1"])
    for name, ip in zip("ab", IPS):
        backend(name, ip, port)
    agent_a = Agent(IPS[0], agent_port, "up 100%")
    Agent(IPS[1], agent_port, "up 100%")
    tmp = tempfile.mkdtemp(prefix="balanced-agent-")
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 10s
  timeout server 10s
frontend fe
  bind 127.0.0.1:{hp_port}
  default_backend be
backend be
  balance roundrobin
  default-server check inter 200ms fall 2 rise 1 agent-check agent-port {agent_port} agent-inter 100ms weight 100
  server a {IPS[0]}:{port}
  server b {IPS[1]}:{port}
""")
    spec = os.path.join(tmp, "web.yaml")
    with open(spec, "w") as f:
        f.write(f"""apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {{name: web}}
spec:
  endpoints: [{{address: {IPS[0]}, port: {port}}}, {{address: {IPS[1]}, port: {port}}}]
  listeners: [{{name: http, port: {bal_port}}}]
  algorithm: RoundRobin
  healthCheck: {{protocol: TCP, interval: 200ms, timeout: 100ms, rise: 1, fall: 2,
                agent: {{port: {agent_port}, interval: 100ms, timeout: 50ms}}}}
""")
    procs = [
        subprocess.Popen(["haproxy", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([BIN, "standalone", "-f", spec, "--admin", f"127.0.0.1:{admin}", "--bind", "127.0.0.1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        time.sleep(1.5)
        print(f"{'agent a says':<18} {'HAProxy 2.6 a/b':>18} {'balanced a/b':>18}")
        for line in ["up 100%", "50%", "25%", "drain", "ready", "down", "up", "0%", "100%", "hello world"]:
            agent_a.line = line
            time.sleep(1.0)  # several agent intervals and probes
            h, b = shares(hp_port), shares(bal_port)
            fmt = lambda c: f"{c['a']}/{c['b']}" + (f" ({c['error']} errors)" if c["error"] else "")
            print(f"{line:<18} {fmt(h):>18} {fmt(b):>18}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)


if __name__ == "__main__":
    main()

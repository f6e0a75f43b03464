#!/usr/bin/env python3
"""gRPC through balanced's h2c listener while one grpcio server stops under
load (`server.stop(grace=None)`): every call must succeed.

  python3 bench/grpc_stop.py [BALANCED_BIN] [RUNS] [CALLS]
  (defaults: target/debug/balanced, 10 runs, 3000 calls per run)

Three grpcio servers (a real gRPC implementation we did not write) on their
own loopback addresses behind `balanced standalone`; 8 client threads share
one channel to the proxy; a third of the way through each run one server is
stopped abruptly. Streams it refused or never processed must be resent to
another endpoint. What grpcio 1.85 does as it stops is retried by the gRPC
conditions of `retry.on`: it answers the calls it had not started UNAVAILABLE
(`GrpcUnavailable`), the calls its handlers were running CANCELLED
(`GrpcCancelled`), and closes the connection under calls it had taken but
not answered (a gRPC client's UNAVAILABLE, `GrpcUnavailable` again).
DIRECT=1 runs the same load with no proxy (grpcio's own round robin over the
servers); NO_GRPC_RETRY=1 leaves both gRPC conditions out, NO_GRPC_CANCELLED=1
only GrpcCancelled. Prints failed calls per run; exits non-zero if any failed.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

BIN = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "--serve" else "target/debug/balanced"
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] != "--serve" else 10
CALLS = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[1] != "--serve" else 3000
IPS = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
METHOD = "/balanced.test.Echo/Who"


def free_port(ip="127.0.0.1"):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Who(grpc.GenericRpcHandler):
    def __init__(self, name):
        self.name = name.encode()

    def service(self, details):
        if details.method == METHOD:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.name)
        return None


def serve(name, ip, port):
    """One grpcio server in this process until stdin closes or SIGTERM."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((Who(name),))
    assert server.add_insecure_port(f"{ip}:{port}") == port
    server.start()
    print("up", flush=True)
    sys.stdin.readline()
    server.stop(grace=None)
    print("stopped", flush=True)
    time.sleep(0.5)


class Server:
    """A grpcio server in its own process (as pods are): stopping one does
    not touch the others' calls."""

    def __init__(self, name, ip, port):
        self.p = subprocess.Popen([sys.executable, __file__, "--serve", name, ip, str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "up"

    def stop(self, grace=None):
        if self.p.poll() is None:
            try:
                self.p.stdin.write("stop\n")
                self.p.stdin.flush()
                self.p.stdout.readline()
            except (BrokenPipeError, OSError):
                pass

    def kill(self):
        self.p.kill()
        self.p.wait()


def start_server(name, ip, port):
    return Server(name, ip, port)


def run_once(run):
    port = free_port(IPS[0])
    servers = [start_server(n, ip, port) for n, ip in zip("abc", IPS)]
    listen, admin = free_port(), free_port()
    # grpcio (1.85) answers the calls it had not started UNAVAILABLE as it
    # stops and those it was running CANCELLED, to a direct client as well
    # (DIRECT=1): the retry Envoy users set for gRPC (`retry_on:
    # unavailable,cancelled`) resends them.
    grpc_on = "" if os.environ.get("NO_GRPC_CANCELLED") else ", GrpcCancelled"
    retry = "" if os.environ.get("NO_GRPC_RETRY") else f"  retry: {{on: [Error, Timeout, GrpcUnavailable{grpc_on}]}}\n"
    spec = f"""apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {{name: grpc}}
spec:
  endpoints: [{', '.join(f'{{address: {ip}, port: {port}}}' for ip in IPS)}]
  listeners: [{{name: grpc, port: {listen}, appProtocol: kubernetes.io/h2c}}]
  healthCheck: {{protocol: TCP, interval: 500ms, timeout: 200ms, rise: 1, fall: 2}}
{retry}"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(spec)
    log = os.environ.get("ACCESS_LOG")
    extra = ["--access-log", log] if log else []
    proxy = subprocess.Popen([BIN, "standalone", "-f", f.name, "--bind", "127.0.0.1", "--admin", f"127.0.0.1:{admin}"] + extra,
                             stdout=subprocess.DEVNULL, stderr=open(os.environ.get("PROXY_LOG", os.devnull), "a"),
                             env=dict(os.environ, BALANCED_LOG=os.environ.get("BALANCED_LOG", "error")))
    failures = []
    try:
        if os.environ.get("DIRECT"):
            # No proxy: grpcio's own round robin over the three servers, to
            # tell the servers' answers from ours.
            target = "ipv4:" + ",".join(f"{ip}:{port}" for ip in IPS)
            options = [("grpc.lb_policy_name", "round_robin")]
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
        grpc.channel_ready_future(channel).result(timeout=10)
        call = channel.unary_unary(METHOD)
        # Every endpoint healthy before the load starts.
        deadline = time.time() + 10
        seen = set()
        while len(seen) < 3 and time.time() < deadline:
            seen.add(call(b"", timeout=5))
        counter = iter(range(CALLS))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i == CALLS // 3:
                    servers[run % 3].stop(grace=None)
                try:
                    call(b"", timeout=5)
                except grpc.RpcError as e:
                    with lock:
                        failures.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        channel.close()
    finally:
        proxy.kill()
        proxy.wait()
        for s in servers:
            s.kill()
        os.unlink(f.name)
    return failures


def main():
    total = 0
    for run in range(RUNS):
        failures = run_once(run)
        total += len(failures)
        print(f"run {run + 1}: {CALLS} calls, {len(failures)} failed {sorted(set(failures)) if failures else ''}")
    print(f"{total} failed calls in {RUNS} runs")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()

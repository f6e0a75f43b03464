#!/usr/bin/env python3
"""A real gRPC client we did not write (grpcio's xDS resolver) against
balanced's xDS server: `python3 tests/xds/grpc_xds.py target/debug/balanced`.

Three grpcio servers are the endpoints of one BalancedService (each on its own
loopback address, as pods are, with a HAProxy-style agent on the same port on
each). balanced standalone probes them and serves xDS; the client dials
xds:///web.default:PORT from a bootstrap file. Checked:
  - calls spread over all three;
  - one server killed: the client stops using it within fall x interval + 1 s;
  - it is used again after it is revived;
  - an endpoint whose agent says `drain` gets no new calls;
  - with iptables (skipped without it): an endpoint blackholed, so the client's
    open connection to it hangs and nothing but our probes can tell, stops
    getting calls once balanced marks it down.
Prints the measured times; exits non-zero on any failure.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent import futures

import grpc

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/balanced"
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NAMES = ["a", "b", "c"]
METHOD = "/balanced.test.Echo/Who"
INTERVAL, FALL = 0.5, 2  # the health check below: interval 500ms, fall 2


def free_port(ips):
    """A port free on every address in `ips`."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        ok = True
        for ip in ips[1:]:
            with socket.socket() as t:
                try:
                    t.bind((ip, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no port free on every address")


class Who(grpc.GenericRpcHandler):
    def __init__(self, name):
        self.name = name.encode()

    def service(self, details):
        if details.method == METHOD:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self.name)
        return None


def start_server(name, ip, port):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Who(name),))
    bound = server.add_insecure_port(f"{ip}:{port}")
    assert bound == port, f"server {name} could not bind {ip}:{port}"
    server.start()
    return server


class Agent(threading.Thread):
    """Answers every connection with its current line, as HAProxy's agents do."""

    def __init__(self, ip, port):
        super().__init__(daemon=True)
        self.line = "up ready"
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(16)

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall((self.line + "\n").encode())
                except OSError:
                    pass


def status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=2) as r:
        return json.load(r)


def wait(what, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Caller(threading.Thread):
    """Calls every 10 ms and records (start time, answering server or error)."""

    def __init__(self, stub):
        super().__init__(daemon=True)
        self.stub = stub
        self.log = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                who = self.stub(b"", timeout=1).decode()
            except grpc.RpcError as e:
                who = "error:" + e.code().name
            self.log.append((t, who))
            time.sleep(0.01)


class Callers:
    """Three callers at once, so one hung call does not stop the sampling."""

    def __init__(self, stub):
        self.threads = [Caller(stub) for _ in range(3)]
        for c in self.threads:
            c.start()

    def since(self, t0):
        return sorted(e for c in self.threads for e in list(c.log) if e[0] >= t0)

    @property
    def log(self):
        return self.since(0)

    def stop(self):
        for c in self.threads:
            c.stop.set()
        for c in self.threads:
            c.join()


RULE = "balanced-xds-test"


def iptables_usable():
    return shutil.which("iptables") is not None and subprocess.run(
        ["iptables", "-L", "INPUT", "-n"], capture_output=True).returncode == 0


def blackhole(ip, port, on):
    """Drops every packet to ip:port (probes, new and open connections)."""
    rule = ["INPUT", "-d", ip, "-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", RULE, "-j", "DROP"]
    subprocess.run(["iptables", "-I" if on else "-D", *rule], check=True, capture_output=True)


def main():
    port = free_port(IPS)
    agent_port = free_port(IPS)
    listen = free_port(["127.0.0.1"])
    xds = free_port(["127.0.0.1"])
    admin = f"127.0.0.1:{free_port(['127.0.0.1'])}"
    servers = {n: start_server(n, ip, port) for n, ip in zip(NAMES, IPS)}
    agents = {n: Agent(ip, agent_port) for n, ip in zip(NAMES, IPS)}
    for a in agents.values():
        a.start()

    tmp = tempfile.mkdtemp(prefix="balanced-xds-")
    spec = os.path.join(tmp, "web.yaml")
    endpoints = "\n".join(f"  - {{address: {ip}, port: {port}}}" for ip in IPS)
    with open(spec, "w") as f:
        f.write(
            "apiVersion: balanced.dev/v1alpha1\nkind: BalancedService\n"
            "metadata: {name: web, namespace: default}\nspec:\n"
            f"  endpoints:\n{endpoints}\n"
            f"  listeners: [{{name: grpc, port: {listen}, protocol: HTTP}}]\n"
            "  healthCheck: {protocol: TCP, interval: 500ms, timeout: 200ms, rise: 1, fall: 2,"
            f" agent: {{port: {agent_port}, interval: 200ms, timeout: 100ms}}}}\n"
        )
    bootstrap = os.path.join(tmp, "bootstrap.json")
    with open(bootstrap, "w") as f:
        json.dump(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{xds}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": "grpcio-test", "locality": {"zone": "test"}},
            },
            f,
        )
    log = open(os.path.join(tmp, "balanced.log"), "w")
    proc = subprocess.Popen(
        [BIN, "standalone", "-f", spec, "--admin", admin, "--bind", "127.0.0.1", "--xds", f"127.0.0.1:{xds}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "BALANCED_LOG": "info,balanced::xds=debug"},
    )
    try:
        wait(
            "three healthy endpoints",
            lambda: sum(e["state"] == "Healthy" for e in status(admin)["services"][0]["endpoints"]) == 3,
        )
        os.environ["GRPC_XDS_BOOTSTRAP"] = bootstrap
        channel = grpc.insecure_channel(f"xds:///web.default:{listen}")
        stub = channel.unary_unary(METHOD)
        caller = Callers(stub)

        # 1. Calls spread over all three.
        t0 = time.monotonic()
        wait("calls to reach all three", lambda: set(NAMES) <= {w for _, w in caller.since(t0)}, 15)
        time.sleep(1.0)
        spread = Counter(w for _, w in caller.since(t0 + 0.5))
        print(f"spread over 1 s: {dict(spread)}")
        assert all(spread[n] > 0 for n in NAMES), spread

        # 2. Kill b: the client stops using it within fall x interval + 1 s.
        servers["b"].stop(0)
        killed = time.monotonic()
        limit = FALL * INTERVAL + 1.0
        wait("b unhealthy in balanced", lambda: any(
            e["address"] == IPS[1] and e["state"] == "Unhealthy" for e in status(admin)["services"][0]["endpoints"]), limit + 2)
        marked = time.monotonic() - killed
        time.sleep(limit)
        after = caller.since(killed)
        last_b = max((t for t, w in after if w == "b"), default=killed) - killed
        errors = Counter(w for _, w in after if w.startswith("error"))
        served = Counter(w for _, w in after)
        print(f"kill: last call answered by b {last_b * 1000:.0f} ms after the kill; "
              f"balanced marked it Unhealthy after {marked * 1000:.0f} ms; "
              f"calls since: {dict(served)}")
        assert last_b <= limit, f"b still used {last_b:.2f}s after the kill (limit {limit}s)"
        tail = Counter(w for t, w in after if t - killed > limit - 0.2)
        assert tail["b"] == 0 and sum(tail[n] for n in ("a", "c")) > 0, tail
        assert not any(k.startswith("error") for k in tail), f"errors after the switch: {tail}"

        # 3. Revive b: used again.
        servers["b"] = start_server("b", IPS[1], port)
        revived = time.monotonic()
        wait("b to answer calls again", lambda: any(w == "b" for _, w in caller.since(revived)), 10)
        back = min(t for t, w in caller.since(revived) if w == "b") - revived
        print(f"revival: first call answered by b {back * 1000:.0f} ms after it came back")

        # 4. c's agent says drain: no new calls for c.
        agents["c"].line = "drain"
        drained = time.monotonic()
        wait("c draining in balanced", lambda: any(
            e["address"] == IPS[2] and e["draining"] for e in status(admin)["services"][0]["endpoints"]), 5)
        wait("calls to stop reaching c", lambda: not any(
            w == "c" for t, w in caller.since(time.monotonic() - 0.3)), 5)
        gone = time.monotonic() - drained
        quiet = time.monotonic()
        time.sleep(1.0)
        window = Counter(w for _, w in caller.since(quiet))
        print(f"drain: c stopped getting calls within {gone * 1000:.0f} ms of its agent saying drain; "
              f"next second: {dict(window)}")
        assert window["c"] == 0 and window["a"] > 0 and window["b"] > 0, window
        agents["c"].line = "ready"
        ready = time.monotonic()
        wait("c back after ready", lambda: any(w == "c" for _, w in caller.since(ready)), 5)

        # 5. Blackhole c: its open connection hangs, and only our probes
        # (connect timeouts) can tell; the client must move on once balanced
        # marks it down: fall x interval + the probe timeout + 1 s.
        if iptables_usable():
            blackhole(IPS[2], port, True)
            try:
                holed = time.monotonic()
                wait("c unhealthy after the blackhole", lambda: any(
                    e["address"] == IPS[2] and e["state"] == "Unhealthy"
                    for e in status(admin)["services"][0]["endpoints"]), 5)
                marked = time.monotonic() - holed
                limit = FALL * INTERVAL + 0.2 + 1.0
                time.sleep(limit + 1.0)  # the one-second deadline of the last hung calls
                after = caller.since(holed)
                hung = [t - holed for t, w in after if w == "error:DEADLINE_EXCEEDED"]
                last = max(hung, default=0.0)
                tail = Counter(w for t, w in after if t - holed > limit)
                print(f"blackhole: balanced marked c Unhealthy after {marked * 1000:.0f} ms; "
                      f"the last call sent to c started {last * 1000:.0f} ms after the blackhole; "
                      f"{len(hung)} calls hung to their 1 s deadline; after: {dict(tail)}")
                assert last <= limit, f"calls still went to c {last:.2f}s after the blackhole (limit {limit}s)"
                assert tail["c"] == 0 and not any(k.startswith("error") for k in tail) and tail["a"] > 0, tail
            finally:
                blackhole(IPS[2], port, False)
            back = time.monotonic()
            wait("c back after the blackhole", lambda: any(w == "c" for _, w in caller.since(back)), 10)
        else:
            print("blackhole: skipped (iptables is not usable here)")

        caller.stop()
        channel.close()
        total = Counter(w.split(":")[0] for _, w in caller.log)
        print(f"calls: {sum(total.values())}, errors: {total['error']}")
        # The client accepted every resource (the least_request cluster among
        # them): balanced logs each ACK, and a NACK as a warning.
        log.flush()
        with open(os.path.join(tmp, "balanced.log")) as f:
            text = f.read()
        assert "NACK" not in text, "grpcio rejected a resource: " + next(l for l in text.splitlines() if "NACK" in l)
        acked = {line.split("type_url=")[1].split()[0].rsplit(".", 1)[1]
                 for line in text.splitlines() if "xDS ACK" in line}
        print(f"ACKed by grpcio: {sorted(acked)}")
        assert acked == {"Listener", "Cluster", "ClusterLoadAssignment"}, acked
        print("xDS with grpcio: OK")
    except Exception:
        log.flush()
        with open(os.path.join(tmp, "balanced.log")) as f:
            sys.stderr.write("--- balanced log (last 60 lines) ---\n" + "".join(f.readlines()[-60:]))
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for s in servers.values():
            s.stop(0)


if __name__ == "__main__":
    main()

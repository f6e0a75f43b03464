#!/usr/bin/env python3
"""Steady client traffic for tests/image/run.sh, from a container of its own.

Sends GETs at about RATE per second from WORKERS keep-alive connections to
the proxies that are ready, as a Service would route them: a thread polls
each proxy's /readyz every 200 ms, and a request goes only to a proxy that
passed its last poll (round robin among them). Runs for SECONDS, then prints
one JSON line: requests sent, failed (not a 200, or no answer within
TIMEOUT), the first failures' reasons, p50/p99/max latency, and which
backends answered. A request that finds its kept-alive connection closed by
the server while idle is sent again once on a new connection, as curl and
Go's net/http do (counted as stale_resends, not as a failure).

Usage: client.py SECONDS RATE PROXY[,PROXY...]   (PROXY = host:port:adminport)
"""
import http.client
import json
import sys
import threading
import time

SECONDS = float(sys.argv[1])
RATE = float(sys.argv[2])
PROXIES = [tuple(p.split(":")) for p in sys.argv[3].split(",")]
WORKERS = 8
TIMEOUT = 10.0

ready = {p: True for p in PROXIES}
lock = threading.Lock()
stats = {"sent": 0, "failed": 0, "stale_resends": 0, "reasons": [], "latencies": [], "backends": {}}
stop = time.monotonic() + SECONDS


def poll_readiness():
    while time.monotonic() < stop:
        for p in PROXIES:
            host, _, admin = p
            try:
                c = http.client.HTTPConnection(host, int(admin), timeout=0.5)
                c.request("GET", "/readyz")
                ok = c.getresponse().status == 200
                c.close()
            except OSError:
                ok = False
            ready[p] = ok
        time.sleep(0.2)


def worker(index):
    conns = {}
    turn = index
    interval = WORKERS / RATE
    next_at = time.monotonic() + interval * index / WORKERS
    while True:
        now = time.monotonic()
        if now >= stop:
            return
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        live = [p for p in PROXIES if ready[p]]
        if not live:
            continue  # nothing routable: a Service with no ready endpoint
        turn += 1
        p = live[turn % len(live)]
        conn = conns.get(p)
        if conn is None:
            conn = conns[p] = http.client.HTTPConnection(p[0], int(p[1]), timeout=TIMEOUT)
        started = time.monotonic()
        reason = None
        backend = None
        for attempt in (1, 2):
            reused = conn.sock is not None
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace").strip()
                if resp.status != 200:
                    reason = f"{resp.status} from {p[0]}: {body[:120]}"
                backend = resp.getheader("x-backend") or body[:20]
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused and attempt == 1:
                    # A kept-alive connection the server closed while idle (a
                    # proxy that restarted): curl and Go's net/http resend an
                    # idempotent request once on a fresh connection; so do we.
                    with lock:
                        stats["stale_resends"] += 1
                    continue
                reason = f"{type(e).__name__} to {p[0]}: {e}"
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                reason = f"{type(e).__name__} to {p[0]}: {e}"
                break
        took = time.monotonic() - started
        with lock:
            stats["sent"] += 1
            stats["latencies"].append(took)
            if reason:
                stats["failed"] += 1
                if len(stats["reasons"]) < 5:
                    stats["reasons"].append(reason)
            elif backend:
                stats["backends"][backend] = stats["backends"].get(backend, 0) + 1


threading.Thread(target=poll_readiness, daemon=True).start()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat = sorted(stats.pop("latencies")) or [0.0]
stats["p50_ms"] = round(lat[len(lat) // 2] * 1000, 1)
stats["p99_ms"] = round(lat[int(len(lat) * 0.99)] * 1000, 1)
stats["max_ms"] = round(lat[-1] * 1000, 1)
print(json.dumps(stats), flush=True)

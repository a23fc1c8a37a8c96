#!/usr/bin/env python3
"""A complete KWQ worker in Python, standard library only.

It speaks the worker protocol (docs/worker-protocol.md) to a `kwq serve`
host and runs the tasks submitted with `"module": "external:pricer-gpu"`:
no Wasm, any code you like. Here the "GPU pricer" is the Black-Scholes
formula; put your CUDA kernel, legacy C++ library or container call in
`price()`.

    python3 examples/python-worker/worker.py --server http://127.0.0.1:7700

Submit work for it with any client:

    curl -s localhost:7700/v1/tasks -H 'content-type: application/json' -d \
      '{"module": "external:pricer-gpu", "payload": {"spot": 42, "strike": 40,
        "rate": 0.1, "vol": 0.2, "maturity": 0.5, "kind": "call"}}'

What it does, as any worker must: register once; lease a batch by long
poll; send a heartbeat for the leases it holds (a thread, every
`heartbeat_ms`); report every outcome (completed, or failed with a kind
and message); register again if the host answers 404 `unknown_worker`
(it restarted); retry with backoff while the host is unreachable. A
report answered 409 `stale_lease` means the lease lapsed and the task went
to another worker: drop that result.
"""

import argparse
import base64
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request


class Host:
    """The scheduler host's worker protocol over HTTP."""

    def __init__(self, server, token):
        self.server = server.rstrip("/")
        self.token = token

    def call(self, method, path, body=None, timeout=30):
        """(status, decoded JSON body or None); raises OSError when unreachable."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if self.token:
            request.add_header("authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, {"error": {"code": "http", "message": raw.decode(errors="replace")}}


def norm_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def price(params):
    """Black-Scholes price of a European option: the stand-in for real work."""
    spot, strike = float(params["spot"]), float(params["strike"])
    rate, vol, maturity = float(params["rate"]), float(params["vol"]), float(params["maturity"])
    kind = params.get("kind", "call")
    if spot <= 0 or strike <= 0 or vol <= 0 or maturity <= 0:
        raise ValueError("spot, strike, vol and maturity must be positive")
    d1 = (math.log(spot / strike) + (rate + vol * vol / 2) * maturity) / (vol * math.sqrt(maturity))
    d2 = d1 - vol * math.sqrt(maturity)
    discounted = strike * math.exp(-rate * maturity)
    if kind == "call":
        value = spot * norm_cdf(d1) - discounted * norm_cdf(d2)
    elif kind == "put":
        value = discounted * norm_cdf(-d2) - spot * norm_cdf(-d1)
    else:
        raise ValueError("kind must be call or put, got %r" % kind)
    return {"price": value, "engine": "python-black-scholes"}


class Worker:
    def __init__(self, host, name, kind, slots, batch):
        self.host, self.name, self.kind, self.slots, self.batch = host, name, kind, slots, batch
        self.worker_id = None
        self.heartbeat_s = 1.0
        self.held = {}  # task_id -> token, for heartbeats
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.done = 0

    def register(self):
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                status, body = self.host.call("POST", "/v1/workers",
                                              {"name": self.name, "slots": self.slots, "kind": self.kind})
            except OSError as error:
                print("host unreachable (%s); retrying" % error, file=sys.stderr)
            else:
                if status == 200:
                    self.worker_id = body["worker_id"]
                    self.heartbeat_s = body["heartbeat_ms"] / 1000.0
                    print("registered as %s" % self.worker_id, flush=True)
                    return
                if 400 <= status < 500:
                    sys.exit("registration refused (%d): %s" % (status, body["error"]["message"]))
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def heartbeats(self):
        while not self.stopping.wait(self.heartbeat_s):
            with self.lock:
                leases = [{"task_id": t, "token": k} for t, k in self.held.items()]
                worker_id = self.worker_id
            if not leases or worker_id is None:
                continue
            try:
                self.host.call("POST", "/v1/workers/%s/heartbeat" % worker_id, {"leases": leases}, timeout=10)
            except OSError:
                pass  # the lease loop notices and backs off

    def run_one(self, lease):
        """The outcome of one leased task: a completed or a failed item."""
        started = time.perf_counter()
        try:
            params = json.loads(base64.b64decode(lease["payload_base64"]) or b"null")
            result = price(params)
        except (ValueError, KeyError, TypeError) as error:
            return "failed", {"task_id": lease["task_id"], "token": lease["token"], "kind": "guest_error",
                              "message": "bad payload: %s" % error, "final": True,
                              "run_us": int((time.perf_counter() - started) * 1e6)}
        return "completed", {"task_id": lease["task_id"], "token": lease["token"],
                             "result": json.dumps(result),
                             "run_us": int((time.perf_counter() - started) * 1e6)}

    def loop(self, limit):
        self.register()
        threading.Thread(target=self.heartbeats, daemon=True).start()
        backoff = 0.1
        while not self.stopping.is_set() and (limit is None or self.done < limit):
            try:
                status, body = self.host.call("POST", "/v1/workers/%s/lease" % self.worker_id,
                                              {"max": self.batch, "wait_ms": 20000}, timeout=40)
            except OSError as error:
                print("host unreachable (%s); retrying" % error, file=sys.stderr)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if status == 404:  # the host restarted or forgot us: our leases are gone
                with self.lock:
                    self.held.clear()
                self.register()
                continue
            if status != 200:
                print("lease refused (%d): %s" % (status, body), file=sys.stderr)
                time.sleep(1)
                continue
            leases = body["leases"]
            if not leases:
                continue
            with self.lock:
                for lease in leases:
                    self.held[lease["task_id"]] = lease["token"]
            report = {"started": [{"task_id": l["task_id"], "token": l["token"]} for l in leases],
                      "completed": [], "failed": []}
            for lease in leases:
                outcome, item = self.run_one(lease)
                report[outcome].append(item)
            self.send_report(report)
            with self.lock:
                for lease in leases:
                    self.held.pop(lease["task_id"], None)
            self.done += len(leases)
        self.stopping.set()
        if self.worker_id:
            try:
                self.host.call("DELETE", "/v1/workers/%s" % self.worker_id, timeout=5)
            except OSError:
                pass

    def send_report(self, report):
        backoff = 0.1
        while True:
            try:
                status, body = self.host.call("POST", "/v1/workers/%s/report" % self.worker_id, report)
            except OSError:
                time.sleep(backoff)  # keep the outcomes; try again
                backoff = min(backoff * 2, 2.0)
                continue
            if status == 409:
                print("%d outcomes refused: their leases lapsed and the tasks went elsewhere"
                      % len(body.get("refused", [])), file=sys.stderr)
            elif status != 200:
                print("report refused (%d): %s" % (status, body), file=sys.stderr)
            return


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=os.environ.get("KWQ_SERVER", "http://127.0.0.1:7700"))
    parser.add_argument("--worker-token", default=os.environ.get("KWQ_WORKER_TOKEN"))
    parser.add_argument("--kind", default="external:pricer-gpu")
    parser.add_argument("--name", default=socket.gethostname() + "-py")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="most tasks per lease request")
    parser.add_argument("--tasks", type=int, default=None, help="stop after this many (for tests)")
    args = parser.parse_args()
    worker = Worker(Host(args.server, args.worker_token), args.name, args.kind, args.slots, args.batch)
    try:
        worker.loop(args.tasks)
    except KeyboardInterrupt:
        worker.stopping.set()


if __name__ == "__main__":
    main()

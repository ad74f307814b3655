#!/usr/bin/env python3
"""Latency of a cached logon while a flood of wrong passwords hits the XML service.

Starts brokerd (--brokerd, default build/apps/brokerd) on the demo site (config/demo.toml with
free ports and a temporary database), logs alice on once so her success is cached, then measures
RequestAppData for alice (a cached logon: no password hash) one after the other:

  1. alone, for --seconds;
  2. while --flood clients (threads, each on its own keep-alive connection from 127.0.0.2, so a
     per-address throttle of the flood does not touch the probe from 127.0.0.1) send
     RequestValidateCredentials with wrong passwords for names that do not exist (each one costs
     a PBKDF2 hash and none locks out), for --seconds.

Prints p50/p90/p99/max of the probe in both phases and what the flood got back (by ErrorId).
--extra appends TOML to the config (e.g. '[xml]\\nfailed_logons_per_minute = 0'). A benchmark,
not a test: it asserts nothing. Figures: docs/BENCHMARKS.md.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APPDATA = """<?xml version="1.0" encoding="UTF-8"?>
<NFuseProtocol version="5.1"><RequestAppData><Scope traverse="subtree"/><DesiredDetails>defaults</DesiredDetails><Credentials><UserName>alice</UserName><Password>alice-pass</Password><Domain type="NT">DEMO</Domain></Credentials></RequestAppData></NFuseProtocol>"""


def wrong(i):
    return ("<NFuseProtocol version=\"5.1\"><RequestValidateCredentials><Credentials><UserName>nobody%d</UserName>"
            "<Password>wrong</Password><Domain type=\"NT\">DEMO</Domain></Credentials></RequestValidateCredentials>"
            "</NFuseProtocol>" % i)


def config(tmp, extra):
    with open(os.path.join(ROOT, "config", "demo.toml")) as f:
        text = f.read()
    for port in ("port = 8080", "port = 8081", "port = 8082"):
        text = text.replace(port, "port = 0", 1)
    text = text.replace('path = "../var/demo.db"', 'path = "%s"' % os.path.join(tmp, "demo.db"))
    text = text.replace('level = "info"', 'level = "warn"')  # the log is not what is measured
    return text + "\n" + extra.replace("\\n", "\n") + "\n"


def post(conn, body):
    conn.request("POST", "/scripts/wpnbr.dll", body=body, headers={"Content-Type": "text/xml"})
    r = conn.getresponse()
    return r.read().decode("utf-8", "replace")


def percentiles(samples):
    s = sorted(samples)
    if not s:
        return "no samples"
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1000
    return "n=%d p50=%.1f ms p90=%.1f ms p99=%.1f ms max=%.1f ms" % (len(s), pick(0.5), pick(0.9), pick(0.99), s[-1] * 1000)


def probe(port, seconds):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    samples, errors = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        body = post(conn, APPDATA)
        samples.append(time.monotonic() - t)
        if "<ErrorId>" in body:
            errors += 1
    return samples, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokerd", default=os.path.join(ROOT, "build", "apps", "brokerd"))
    ap.add_argument("--flood", type=int, default=16, help="concurrent flood clients (default 16)")
    ap.add_argument("--seconds", type=float, default=10, help="length of each phase (default 10)")
    ap.add_argument("--extra", default="", help="TOML appended to the config")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="xml-flood-")
    proc = None
    try:
        with open(os.path.join(tmp, "brokerd.toml"), "w") as f:
            f.write(config(tmp, args.extra))
        ready = os.path.join(tmp, "ready.json")
        log = open(os.path.join(tmp, "brokerd.log"), "w")
        proc = subprocess.Popen([args.brokerd, "--config", os.path.join(tmp, "brokerd.toml"), "--ready-file", ready],
                                stdout=log, stderr=log)
        for _ in range(600):
            if os.path.exists(ready) or proc.poll() is not None:
                break
            time.sleep(0.1)
        if not os.path.exists(ready):
            sys.exit("brokerd did not start; see " + os.path.join(tmp, "brokerd.log"))
        port = json.load(open(ready))["xml"]

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        first = time.monotonic()
        assert "<InName>" in post(conn, APPDATA), "alice cannot log on"
        print("brokerd %s\nfirst logon (one PBKDF2 hash): %.1f ms" % (args.brokerd, (time.monotonic() - first) * 1000))

        samples, errors = probe(port, args.seconds)
        print("cached logon, alone:       %s%s" % (percentiles(samples), ", %d errors" % errors if errors else ""))

        stop = threading.Event()
        results, lock = {}, threading.Lock()

        def flood(k):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=("127.0.0.2", 0))
            i = 0
            while not stop.is_set():
                try:
                    body = post(c, wrong(k * 1000000 + i))
                except Exception as e:  # a closed connection: count it and reconnect
                    body = "<ErrorId>(%s)</ErrorId>" % type(e).__name__
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=("127.0.0.2", 0))
                m = re.search(r"<ErrorId>([^<]*)</ErrorId>", body)
                key = m.group(1) if m else "ok"
                with lock:
                    results[key] = results.get(key, 0) + 1
                i += 1

        threads = [threading.Thread(target=flood, args=(k,)) for k in range(args.flood)]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(1)  # let the flood build up
        samples, errors = probe(port, args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        print("cached logon, under flood: %s%s" % (percentiles(samples), ", %d errors" % errors if errors else ""))
        total = sum(results.values())
        print("flood: %d clients, %d requests in %.1f s (%.0f/s): %s" % (
            args.flood, total, elapsed, total / elapsed, ", ".join("%s %d" % kv for kv in sorted(results.items()))))
    finally:
        if proc and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Soak of `agestream serve`: N looping clips for a while, the server's resident memory, FPS
and visits sampled every minute, then a clean stop (README, "Serving several cameras").

Not a CI test. The issue's measurement, 4 looping streams for 30 minutes:

    python tools/serve_soak.py CLIP1 CLIP2 CLIP3 CLIP4 --minutes 30 --out runs/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from stream.visits import open_store


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def streams(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/streams", timeout=5) as answer:
        return json.load(answer)


def sample(process: subprocess.Popen, port: int, database: Path, started: float) -> dict:
    now = streams(port)
    with open_store(database, create=False) as store:
        visits = len(store.visits(0, time.time() + 1, limit=10**7))
    return {
        "minute": round((time.monotonic() - started) / 60, 2),
        "rss_mb": round(rss_mb(process.pid), 1),
        "fps": [s["fps"] for s in now],
        "states": [s["state"] for s in now],
        "visits": visits,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every-s", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    port, folder = free_port(), Path(tempfile.mkdtemp(prefix="serve-soak-"))
    database = folder / "visits.db"
    command = [sys.executable, "-m", "stream", "serve", *args.clips, "--loop"]
    command += ["--port", str(port), "--database", str(database)]
    log = (folder / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    started, samples = time.monotonic(), []
    try:
        deadline = started + 120
        while time.monotonic() < deadline:
            try:
                if len(streams(port)) == len(args.clips) and database.exists():
                    break
            except OSError:
                pass
            time.sleep(1)
        end = started + args.minutes * 60
        while True:
            samples.append(sample(process, port, database, started))
            print(json.dumps(samples[-1]), flush=True)
            if time.monotonic() >= end:
                break
            time.sleep(min(args.every_s, max(0.0, end - time.monotonic())))
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)
    record = {"clips": args.clips, "minutes": args.minutes, "exit": code, "samples": samples,
              "log": str(folder / "serve.log"), "database": str(database)}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=1))
    first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    print(f"RSS {first:.0f} -> {last:.0f} MB over {samples[-1]['minute']:.1f} min, exit {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

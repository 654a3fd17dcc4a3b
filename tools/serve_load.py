"""Measure `agestream serve` under MJPEG viewers: pipeline FPS and memory with none, then with N.

Starts `agestream serve CLIP CLIP --loop` on 127.0.0.1 (a free port), samples every stream's
FPS from /api/streams and the server's resident memory for `--seconds` with no viewer, then
for as long with `--viewers` clients reading the streams' /stream/ID.mjpg in turn, and prints
both phases side by side. Loopback only, bounded in viewers and time. Example:

    python tools/serve_load.py ../shared/data/videos/livePortrait__source__s32.mp4 --viewers 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

MAX_VIEWERS = 50
MAX_SECONDS = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


async def viewer(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> int:
    """Read an MJPEG stream until `stop`; the bytes read."""
    read = 0
    async with session.get(url) as response:
        while not stop.is_set():
            chunk = await response.content.read(65536)
            if not chunk:
                break
            read += len(chunk)
    return read


async def phase(base: str, pid: int, viewers: int, seconds: float) -> dict:
    """FPS per stream and memory, sampled every second for `seconds`, with `viewers` open."""
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        streams = [s["id"] for s in await (await session.get(f"{base}/api/streams")).json()]
        urls = [f"{base}/stream/{streams[i % len(streams)]}.mjpg" for i in range(viewers)]
        tasks = [asyncio.create_task(viewer(session, url, stop)) for url in urls]
        fps, memory = [], []
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            listed = await (await session.get(f"{base}/api/streams")).json()
            fps.append(sum(s["fps"] for s in listed))
            memory.append(resident_mb(pid))
        stop.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    received = sum(r for r in done if isinstance(r, int))
    half = len(memory) // 2
    return {
        "viewers": viewers,
        "fps_median": statistics.median(fps[2:]),
        "memory_mb_first_half": statistics.median(memory[:half]),
        "memory_mb_second_half": statistics.median(memory[half:]),
        "mjpeg_mb_received": received / 1e6,
    }


def wait_ready(base: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}")
        try:
            listed = json.load(urllib.request.urlopen(f"{base}/api/streams", timeout=2))
            if listed and all(s["state"] == "running" for s in listed):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("serve did not start in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", type=Path)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    viewers, seconds = min(args.viewers, MAX_VIEWERS), min(args.seconds, MAX_SECONDS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "stream", "serve", *[str(args.clip)] * args.streams]
    process = subprocess.Popen([*command, "--loop", "--port", str(port)])
    try:
        wait_ready(base, process)
        results = [asyncio.run(phase(base, process.pid, n, seconds)) for n in (0, viewers)]
    finally:
        process.terminate()
        process.wait(timeout=30)
    quiet, loaded = results
    print(json.dumps(results, indent=2))
    print(
        f"FPS with {viewers} viewers: {loaded['fps_median']:.1f} against "
        f"{quiet['fps_median']:.1f} with none ({loaded['fps_median'] / quiet['fps_median']:.1%}); "
        f"memory {loaded['memory_mb_first_half']:.0f} → {loaded['memory_mb_second_half']:.0f} MB"
    )


if __name__ == "__main__":
    main()

"""Load generators: an open-loop asyncio client at fixed rates, and wrk flat out."""

import asyncio
import collections
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LUA = Path(__file__).resolve().parent / "typeform.lua"


@dataclass
class LoadResult:
    """What one load run measured."""

    sent: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    statuses: str = ""

    @property
    def rps(self) -> float:
        """Answered requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0


def percentile(values: list[float], share: float) -> float:
    """The share-quantile (0..1) of values, 0.0 when there are none."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(share * 1000) - 1]


def _request(host: str, path: str, signature: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Typeform-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _exchange(
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> int:
    reader, writer = streams
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match.group(1)))
    if re.search(rb"(?i)\r\nconnection:\s*close", head):
        writer.close()
        raise ConnectionResetError("server closed the connection")
    return status


async def _fixed_rate(
    url: str, path: str, deliveries: list[tuple[str, bytes]], rate: float
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    errors = 0
    statuses: collections.Counter = collections.Counter()

    async def one(scheduled: float, signature: str, body: bytes) -> None:
        nonlocal errors
        request = _request(f"{host}:{port}", path, signature, body)
        for _ in range(2):
            streams = idle.pop() if idle else await asyncio.open_connection(host, port)
            try:
                status = await _exchange(streams, request)
            except (OSError, asyncio.IncompleteReadError):
                # A recycled gunicorn worker closed a kept-alive connection: send again.
                continue
            idle.append(streams)
            if status == 200:
                # Measured from the scheduled send time, so a stall counts (open loop).
                latencies.append((time.perf_counter() - scheduled) * 1000)
            else:
                errors += 1
                statuses[status] += 1
            return
        errors += 1
        statuses["closed"] += 1

    started = time.perf_counter()
    tasks = []
    for index, (signature, body) in enumerate(deliveries):
        scheduled = started + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, signature, body)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    for _, writer in idle:
        writer.close()
    return LoadResult(
        sent=len(deliveries),
        ok=len(latencies),
        seconds=seconds,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        errors=errors,
        statuses=", ".join(f"{key}: {value}" for key, value in sorted(statuses.items(), key=str)),
    )


def fixed_rate(
    url: str, path: str, deliveries: Iterable[tuple[str, bytes]], rate: float
) -> LoadResult:
    """Send each delivery at its scheduled time (index / rate) and time each answer."""
    return asyncio.run(_fixed_rate(url, path, list(deliveries), rate))


def ensure_wrk() -> str:
    """The wrk binary; installed from Debian's packages when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, capture_output=True)
    return shutil.which("wrk") or "wrk"


def flat_out(
    url: str, path: str, requests_file: Path, seconds: int, connections: int = 16
) -> LoadResult:
    """wrk with one thread and `connections` kept-alive connections for `seconds`."""
    command = [
        ensure_wrk(),
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url + path,
    ]
    env = {**os.environ, "BENCH_REQUESTS": str(requests_file), "BENCH_THREADS": "1"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    match = re.search(r"BENCH (.*)", out)
    if match is None:
        raise SystemExit(f"bench: wrk printed no summary:\n{out}")
    fields = dict(item.split("=") for item in match.group(1).split())
    total, failed = int(fields["requests"]), int(fields["errors"]) + int(fields["non2xx"])
    return LoadResult(
        sent=total,
        ok=total - int(fields["non2xx"]),
        seconds=int(fields["duration_us"]) / 1e6,
        p50_ms=int(fields["p50_us"]) / 1000,
        p99_ms=int(fields["p99_us"]) / 1000,
        errors=failed,
    )

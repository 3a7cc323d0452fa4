"""Drive a running fxserve on this machine with a bounded load and report what happened.

The script posts one image per request from ``--concurrency`` clients for
``--duration`` seconds, optionally paced to ``--rate`` requests per second in total,
then stops by itself. It prints a readable summary and ends with one JSON line of
the figures: requests, errors by status, latency percentiles, throughput, and the
server's resident memory (RSS) at the start and the end.

    python -m bench.load --url http://127.0.0.1:8000 --duration 30 --concurrency 16
    python -m bench.load --url http://127.0.0.1:8000 --path '/embed?model=resnet18' --rate 50

Only loopback targets are accepted (127.0.0.0/8, ``localhost``, ``::1``). RSS comes
from ``/proc/PID/status``: pass ``--pid``, or the script looks up the process that
listens on the URL's port, which works for servers of the same user on Linux.

Soak: ``--soak`` runs 600 s, treats the first 60 s as warm-up, samples RSS every
5 s and reports the growth between the end of the warm-up and the end, in percent:

    python -m bench.load --soak --url http://127.0.0.1:8000 --path '/embed?model=resnet18' --concurrency 16

``run_load`` returns the same figures as a dict, for tests that need a small load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

__all__ = ["ImageFile", "builtin_photos", "check_loopback_url", "find_listening_pid", "load_image_folder", "main", "read_rss_bytes", "run_load"]

SOAK_DURATION_S = 600.0
SOAK_WARMUP_S = 60.0
SOAK_SAMPLE_INTERVAL_S = 5.0

_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
_TCP_LISTEN_STATE = "0A"


@dataclass(frozen=True)
class ImageFile:
    name: str
    data: bytes
    content_type: str


@dataclass
class _Tally:
    """Outcomes collected by every client of one run."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)

    def count_status(self, status: int) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def count_transport_error(self, exc: Exception) -> None:
        key = f"transport:{type(exc).__name__}"
        self.transport_errors[key] = self.transport_errors.get(key, 0) + 1


def check_loopback_url(url: str) -> None:
    """Raise ValueError unless ``url`` is http(s) on 127.0.0.0/8, localhost or ::1."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL {url!r} must start with http:// or https://")
    host = parts.hostname or ""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host {host!r} of {url!r} is not a loopback address; use 127.0.0.0/8, localhost or ::1") from None
    if not address.is_loopback:
        raise ValueError(f"host {host!r} of {url!r} is not a loopback address; use 127.0.0.0/8, localhost or ::1")


def builtin_photos() -> list[ImageFile]:
    """Four real photographs shipped with scikit-image, encoded as JPEG."""
    from PIL import Image
    from skimage import data

    photos = []
    for name, array in (("astronaut", data.astronaut()), ("chelsea", data.chelsea()), ("coffee", data.coffee()), ("rocket", data.rocket())):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        photos.append(ImageFile(f"{name}.jpg", buffer.getvalue(), "image/jpeg"))
    return photos


def load_image_folder(folder: Path) -> list[ImageFile]:
    """Read every file with an image extension in ``folder``, sorted by name.

    Raises ValueError when the folder contains no such file.
    """
    images = []
    for path in sorted(folder.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix.lower())
        if content_type is not None and path.is_file():
            images.append(ImageFile(path.name, path.read_bytes(), content_type))
    if not images:
        raise ValueError(f"folder {folder} has no files ending in {', '.join(_CONTENT_TYPES)}")
    return images


def read_rss_bytes(pid: int) -> int | None:
    """Return the resident memory of process ``pid`` from /proc, or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def find_listening_pid(port: int) -> int | None:
    """Return the id of a process with a TCP socket listening on ``port``, or None.

    Reads the socket inodes from /proc/net/tcp and tcp6, then looks for them among
    the open files of every process this user may inspect.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            columns = row.split()
            local_address, state, inode = columns[1], columns[3], columns[9]
            if state == _TCP_LISTEN_STATE and int(local_address.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for descriptor in (entry / "fd").iterdir():
                if os.readlink(descriptor) in inodes:
                    return int(entry.name)
        except OSError:
            continue  # Skip another user's process, or one that has just exited.
    return None


def run_load(
    url: str,
    *,
    path: str = "/embed",
    duration_s: float = 10.0,
    concurrency: int = 8,
    rate: float | None = None,
    images: list[ImageFile] | None = None,
    pid: int | None = None,
    warmup_s: float = 0.0,
    sample_interval_s: float = 5.0,
    timeout_s: float = 30.0,
    max_requests: int | None = None,
) -> dict:
    """Post images to ``url`` + ``path`` until ``duration_s`` passes or ``max_requests`` are sent, and return the figures.

    ``rate`` paces the start of requests to that many per second in total, and
    ``concurrency`` caps the requests in flight. Requests still in flight at the
    end may run up to ``timeout_s`` longer. Latency percentiles cover 2xx responses
    only, because rejections such as 429 return at once and would hide the
    service's own latency. RSS figures are None when no server process is found.
    """
    check_loopback_url(url)
    if duration_s <= 0 or concurrency < 1:
        raise ValueError(f"duration_s must be positive and concurrency at least 1, not {duration_s} and {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    if pid is None:
        port = urlsplit(url).port or (443 if url.startswith("https") else 80)
        pid = find_listening_pid(port)
    images = images or builtin_photos()
    return asyncio.run(
        _drive(url.rstrip("/") + path, images, duration_s, concurrency, rate, pid, warmup_s, sample_interval_s, timeout_s, max_requests)
    )


async def _drive(
    target: str,
    images: list[ImageFile],
    duration_s: float,
    concurrency: int,
    rate: float | None,
    pid: int | None,
    warmup_s: float,
    sample_interval_s: float,
    timeout_s: float,
    max_requests: int | None,
) -> dict:
    tally = _Tally()
    started = time.monotonic()
    deadline = started + duration_s
    # The clients share this counter. Only the event loop changes it, so it needs no lock.
    next_request = 0

    def claim_request() -> int | None:
        nonlocal next_request
        if time.monotonic() >= deadline or (max_requests is not None and next_request >= max_requests):
            return None
        claimed = next_request
        next_request += 1
        return claimed

    async def client_loop(client: httpx.AsyncClient) -> None:
        while (number := claim_request()) is not None:
            if rate is not None:
                start_at = started + number / rate
                if start_at >= deadline:
                    return
                await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            image = images[number % len(images)]
            sent = time.perf_counter()
            try:
                response = await client.post(target, files=[("images", (image.name, image.data, image.content_type))])
            except httpx.TransportError as exc:
                tally.count_transport_error(exc)
                continue
            tally.count_status(response.status_code)
            if 200 <= response.status_code < 300:
                tally.latencies_s.append(time.perf_counter() - sent)

    samples: list[tuple[float, int]] = []
    rss_start = read_rss_bytes(pid) if pid is not None else None
    sampler = asyncio.create_task(_sample_rss(pid, started, sample_interval_s, samples)) if pid is not None else None
    warmup_probe = asyncio.create_task(_rss_after(pid, warmup_s)) if pid is not None and warmup_s > 0 else None

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False, so a proxy set in the environment cannot carry the load off this machine.
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed_s = time.monotonic() - started

    if sampler is not None:
        sampler.cancel()
    rss_warmup = None
    if warmup_probe is not None:
        if warmup_probe.done():
            rss_warmup = warmup_probe.result()
        else:
            warmup_probe.cancel()  # the run ended before the warm-up did
    rss_end = read_rss_bytes(pid) if pid is not None else None
    if rss_end is not None:
        samples.append((round(elapsed_s, 2), rss_end))
    return _figures(target, tally, elapsed_s, duration_s, concurrency, rate, pid, rss_start, rss_warmup, rss_end, samples, warmup_s)


async def _sample_rss(pid: int, started: float, interval_s: float, samples: list[tuple[float, int]]) -> None:
    while True:
        rss = read_rss_bytes(pid)
        if rss is not None:
            samples.append((round(time.monotonic() - started, 2), rss))
        await asyncio.sleep(interval_s)


async def _rss_after(pid: int, delay_s: float) -> int | None:
    await asyncio.sleep(delay_s)
    return read_rss_bytes(pid)


def _figures(
    target: str,
    tally: _Tally,
    elapsed_s: float,
    duration_s: float,
    concurrency: int,
    rate: float | None,
    pid: int | None,
    rss_start: int | None,
    rss_warmup: int | None,
    rss_end: int | None,
    samples: list[tuple[float, int]],
    warmup_s: float,
) -> dict:
    responses = sum(tally.statuses.values())
    requests = responses + sum(tally.transport_errors.values())
    ok = sum(count for status, count in tally.statuses.items() if status.startswith("2"))
    errors = {status: count for status, count in tally.statuses.items() if not status.startswith("2")}
    errors.update(tally.transport_errors)

    latency_ms = None
    if tally.latencies_s:
        p50, p95, p99 = np.percentile(np.asarray(tally.latencies_s) * 1000, [50, 95, 99])
        latency_ms = {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1), "max": round(max(tally.latencies_s) * 1000, 1)}

    # Growth is measured from the end of the warm-up, or from the start without one.
    reference = rss_warmup if warmup_s > 0 else rss_start
    growth_pct = None
    if reference and rss_end is not None:
        growth_pct = round((rss_end - reference) / reference * 100, 2)
    return {
        "url": target,
        "concurrency": concurrency,
        "rate": rate,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed_s, 2),
        "requests": requests,
        "ok": ok,
        "statuses": dict(sorted(tally.statuses.items())),
        "errors": dict(sorted(errors.items())),
        "latency_ms": latency_ms,
        "requests_per_s": round(requests / elapsed_s, 2),
        "ok_per_s": round(ok / elapsed_s, 2),
        "server_pid": pid,
        "rss_start_bytes": rss_start,
        "rss_warmup_bytes": rss_warmup,
        "rss_end_bytes": rss_end,
        "rss_max_bytes": max((rss for _, rss in samples), default=None),
        "rss_growth_pct": growth_pct,
        "warmup_s": warmup_s,
        "rss_samples": [[seconds, rss] for seconds, rss in samples],
    }


def format_summary(figures: dict) -> str:
    """Render the figures as a few aligned lines for a person to read."""

    def megabytes(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.1f} MiB"

    latency = figures["latency_ms"]
    latency_line = "no 2xx responses" if latency is None else f"p50 {latency['p50']} ms, p95 {latency['p95']} ms, p99 {latency['p99']} ms, max {latency['max']} ms"
    errors = ", ".join(f"{status}: {count}" for status, count in figures["errors"].items()) or "none"
    lines = [
        f"target      {figures['url']}",
        f"load        {figures['concurrency']} clients, rate {figures['rate'] or 'unpaced'}, {figures['elapsed_s']} s",
        f"requests    {figures['requests']} ({figures['ok']} ok), {figures['requests_per_s']} requests/s, {figures['ok_per_s']} ok/s",
        f"errors      {errors}",
        f"latency     {latency_line} (2xx only)",
        f"server RSS  pid {figures['server_pid'] or '-'}: start {megabytes(figures['rss_start_bytes'])}, "
        f"after warm-up {megabytes(figures['rss_warmup_bytes'])}, end {megabytes(figures['rss_end_bytes'])}, max {megabytes(figures['rss_max_bytes'])}",
    ]
    if figures["rss_growth_pct"] is not None:
        since = "the end of the warm-up" if figures["warmup_s"] > 0 else "the start"
        lines.append(f"RSS growth  {figures['rss_growth_pct']} % from {since} to the end")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the server, on 127.0.0.0/8, localhost or ::1 (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--path", default="/embed", help="path and query to post to (default: /embed)")
    parser.add_argument("--duration", type=float, help=f"seconds of load (default: 30, or {SOAK_DURATION_S:.0f} with --soak)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each with one request in flight (default: 8)")
    parser.add_argument("--rate", type=float, help="requests started per second in total (default: as fast as the clients go)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests even before the duration ends")
    parser.add_argument("--images", type=Path, help="folder of image files to send in turn (default: four scikit-image photos as JPEG)")
    parser.add_argument("--pid", type=int, help="server process id for RSS (default: the process listening on the URL's port)")
    parser.add_argument("--warmup", type=float, help=f"seconds after which RSS growth is measured (default: 0, or {SOAK_WARMUP_S:.0f} with --soak)")
    parser.add_argument("--sample-interval", type=float, help=f"seconds between RSS samples (default: {SOAK_SAMPLE_INTERVAL_S:.0f})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take (default: 30)")
    parser.add_argument("--soak", action="store_true", help=f"steady load for {SOAK_DURATION_S:.0f} s with a {SOAK_WARMUP_S:.0f} s warm-up and RSS sampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    duration_s = SOAK_DURATION_S if args.soak else 30.0
    if args.duration is not None:
        duration_s = args.duration
    warmup_s = SOAK_WARMUP_S if args.soak else 0.0
    if args.warmup is not None:
        warmup_s = args.warmup
    sample_interval_s = args.sample_interval if args.sample_interval is not None else SOAK_SAMPLE_INTERVAL_S
    try:
        check_loopback_url(args.url)
        images = load_image_folder(args.images) if args.images else builtin_photos()
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"bench.load: {exc}\n")
        return 2
    figures = run_load(
        args.url,
        path=args.path,
        duration_s=duration_s,
        concurrency=args.concurrency,
        rate=args.rate,
        images=images,
        pid=args.pid,
        warmup_s=warmup_s,
        sample_interval_s=sample_interval_s,
        timeout_s=args.timeout,
        max_requests=args.max_requests,
    )
    sys.stdout.write(format_summary(figures) + "\n")
    sys.stdout.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

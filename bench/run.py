"""Benchmark fxserve against the raw extractor and a hand-written FastAPI baseline.

One command starts the service on 127.0.0.1 and drives it with N concurrent
clients posting real JPEGs for a fixed time. In the same run it then measures the
raw in-process extractor, a naive FastAPI server, pruning (layer1 vs layer4) and
the response encodings. It prints a table and ends with one JSON line of the figures.

    python -m bench.run                 # resnet50, 16 clients, 30 s per phase
    python -m bench.run --quick         # resnet18, 16 clients, 10 s per phase

Every model uses random weights (seeded), so no download is needed. Random weights
are where subnormal floats appear; the service flushes them to zero
(``torch.set_flush_denormal(True)``) and so do both baselines, so no side is slowed
by them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.encoding import dumps, encode_array, extract_safetensors
from tests.serverproc import REPO_ROOT, ServerProcess, free_port

logger = logging.getLogger("bench")

PREPROCESS = {"resize": 256, "crop": 224}
LAYERS = {"layer1": "layer1", "layer3": "layer3", "layer4": "layer4"}


def load_photos() -> list[bytes]:
    """Four real photographs from scikit-image, as JPEG bytes of their original sizes."""
    from skimage import data

    photos = []
    for array in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


async def drive(url: str, photos: list[bytes], concurrency: int, duration_s: float) -> dict:
    """Post one image per request from ``concurrency`` clients until ``duration_s`` ends."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        sent = worker
        while time.monotonic() < deadline:
            photo = photos[sent % len(photos)]
            sent += 1
            started = time.perf_counter()
            response = await client.post(url, files=[("images", ("photo.jpg", photo, "image/jpeg"))])
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                continue
            latencies.append(elapsed)
            sizes = response.headers.get("x-batch-sizes")
            if sizes:
                batch_sizes.append(max(int(size) for size in sizes.split(",")))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, worker) for worker in range(concurrency)))
    wall_s = time.perf_counter() - started
    return summarize(latencies, wall_s, errors)


def summarize(latencies: list[float], wall_s: float, errors: dict[str, int]) -> dict:
    if not latencies:
        return {"images_per_s": 0.0, "requests": 0, "errors": errors}
    percentiles = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return {
        "images_per_s": round(len(latencies) / wall_s, 2),
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(float(percentiles[0]), 1),
        "p95_ms": round(float(percentiles[1]), 1),
        "p99_ms": round(float(percentiles[2]), 1),
    }


def histogram_mean(metrics_text: str, name: str) -> tuple[float, float]:
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


def measure_service(args, photos: list[bytes], workdir: Path) -> tuple[dict, ServerProcess]:
    config = {
        "models": {
            args.model: {
                "architecture": args.model,
                "weights": None,
                "layers": LAYERS,
                "default_layers": ["layer4"],
                "preprocess": PREPROCESS,
                "max_batch_size": args.max_batch_size,
                "max_wait_ms": args.max_wait_ms,
                "max_queue": 4096,
            }
        }
    }
    env = {"FXSERVE_TORCH_THREADS": str(args.torch_threads), "FXSERVE_DECODE_WORKERS": str(args.decode_workers), "FXSERVE_MAX_RESPONSE_BYTES": str(2**31)}
    server = ServerProcess(config, workdir, env=env, name="bench").start().wait_ready()
    url = f"{server.base_url}/embed?model={args.model}&layer=layer4"
    asyncio.run(drive(url, photos, args.concurrency, min(3.0, args.duration)))  # warm-up
    before = httpx.get(f"{server.base_url}/metrics").text
    result = asyncio.run(drive(url, photos, args.concurrency, args.duration))
    after = httpx.get(f"{server.base_url}/metrics").text
    images_before, batches_before = histogram_mean(before, "fxserve_batch_images")
    images_after, batches_after = histogram_mean(after, "fxserve_batch_images")
    result["mean_batch_size"] = round((images_after - images_before) / max(1.0, batches_after - batches_before), 2)
    return result, server


def server_timing(response: httpx.Response, name: str) -> float:
    for part in response.headers.get("server-timing", "").split(","):
        key, _, value = part.strip().partition(";dur=")
        if key == name:
            return float(value)
    return float("nan")


def measure_pruning(server: ServerProcess, model: str, photos: list[bytes], repeats: int) -> dict:
    """Median forward time and total time of an 8-image request for layer1 vs layer4."""
    files = [("images", (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")) for i in range(8)]
    figures = {}
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for layer in ("layer1", "layer4"):
            inference, total = [], []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                response = client.post("/extract", params={"model": model, "layers": layer, "pool": "avg"}, files=files)
                response.raise_for_status()
                total.append((time.perf_counter() - started) * 1000)
                inference.append(server_timing(response, "inference"))
            figures[layer] = {"inference_ms": round(statistics.median(inference[1:]), 1), "total_ms": round(statistics.median(total[1:]), 1)}
    figures["ratio_layer1_to_layer4_inference"] = round(figures["layer1"]["inference_ms"] / figures["layer4"]["inference_ms"], 3)
    figures["ratio_layer1_to_layer4_total"] = round(figures["layer1"]["total_ms"] / figures["layer4"]["total_ms"], 3)
    return figures


def measure_encodings(server: ServerProcess, model: str, photos: list[bytes], repeats: int) -> dict:
    """Bytes and times of layer3 for 8 images as JSON lists, base64 and safetensors."""
    files = [("images", (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")) for i in range(8)]
    variants = {
        "json": ({"encoding": "json"}, {}),
        "base64": ({"encoding": "base64"}, {}),
        "safetensors": ({}, {"Accept": "application/vnd.safetensors"}),
    }
    figures: dict[str, dict] = {}
    arrays = None
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for name, (params, headers) in variants.items():
            totals = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                response = client.post("/extract", params={"model": model, "layers": "layer3", **params}, files=files, headers=headers)
                response.raise_for_status()
                totals.append((time.perf_counter() - started) * 1000)
            figures[name] = {"bytes": len(response.content), "request_ms": round(statistics.median(totals[1:]), 1)}
            if name == "safetensors":
                from safetensors.numpy import load

                loaded = load(response.content)
                arrays = [{"layer3": loaded[f"{i}/layer3"]} for i in range(8)]
    encoders = {
        "json": lambda: dumps({"results": [{k: encode_array(v, "json") for k, v in r.items()} for r in arrays]}),
        "base64": lambda: dumps({"results": [{k: encode_array(v, "base64") for k, v in r.items()} for r in arrays]}),
        "safetensors": lambda: extract_safetensors(arrays, {"model": model}),
    }
    for name, encode in encoders.items():
        timings = []
        for _ in range(max(5, repeats)):
            started = time.perf_counter()
            encode()
            timings.append((time.perf_counter() - started) * 1000)
        figures[name]["encode_ms"] = round(statistics.median(timings), 3)
    figures["json_to_safetensors_encode_ratio"] = round(figures["json"]["encode_ms"] / max(figures["safetensors"]["encode_ms"], 1e-6), 1)
    return figures


def measure_raw(model_name: str, photos: list[bytes], batch_size: int, duration_s: float, torch_threads: int) -> dict:
    """Measure the same extractor in this process: decode, preprocess and forward, no HTTP."""
    from torchvision import transforms as T
    from torchvision.models import get_model
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.set_num_threads(torch_threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    extractor = create_feature_extractor(get_model(model_name, weights=None).eval(), return_nodes={"layer4": "layer4"}).eval()
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor(), T.ConvertImageDtype(torch.float), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def one_batch(offset: int) -> None:
        images = [Image.open(io.BytesIO(photos[(offset + i) % len(photos)])).convert("RGB") for i in range(batch_size)]
        batch = torch.stack([transform(image) for image in images])
        with torch.inference_mode():
            features = extractor(batch)["layer4"].mean(dim=(2, 3))
            torch.nn.functional.normalize(features, dim=1).numpy()

    one_batch(0)
    processed = 0
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s:
        one_batch(processed)
        processed += batch_size
    return {"images_per_s": round(processed / (time.perf_counter() - started), 2), "batch_size": batch_size}


def measure_naive(args, photos: list[bytes], workdir: Path) -> dict:
    port = free_port()
    log = (workdir / "naive.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(args.torch_threads)}
    process = subprocess.Popen([sys.executable, "-m", "bench.naive_server", args.model, "layer4", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/embed"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        asyncio.run(drive(url, photos, args.concurrency, min(3.0, args.duration)))
        return asyncio.run(drive(url, photos, args.concurrency, args.duration))
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision architecture with layer1..layer4 (default: resnet50)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load phase (default: 30)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="service max_batch_size (default: 16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="service max_wait_ms (default: 10)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for every side (default: all cores)")
    parser.add_argument("--decode-workers", type=int, default=2, help="service decode threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the pruning and encoding requests (default: 5)")
    parser.add_argument("--quick", action="store_true", help="resnet18 and 10 s phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.duration = "resnet18", 10.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    photos = load_photos()
    with tempfile.TemporaryDirectory(prefix="fxserve-bench-") as folder:
        workdir = Path(folder)
        logger.info("service: %s, %d clients, %.0f s", args.model, args.concurrency, args.duration)
        service, server = measure_service(args, photos, workdir)
        try:
            logger.info("pruning and encodings")
            pruning = measure_pruning(server, args.model, photos, args.repeats)
            encodings = measure_encodings(server, args.model, photos, args.repeats)
        finally:
            server.stop()
        batch_size = max(1, round(service["mean_batch_size"]))
        logger.info("raw in-process baseline at batch size %d", batch_size)
        raw = measure_raw(args.model, photos, batch_size, args.duration, args.torch_threads)
        logger.info("naive FastAPI baseline")
        naive = measure_naive(args, photos, workdir)

    figures = {
        "model": args.model,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "service": service,
        "raw": raw,
        "naive": naive,
        "pruning": pruning,
        "encodings": encodings,
        "ratio_service_to_raw": round(service["images_per_s"] / raw["images_per_s"], 3),
        "ratio_service_to_naive": round(service["images_per_s"] / max(naive["images_per_s"], 1e-9), 2),
    }
    print_table(figures)
    sys.stdout.write(json.dumps(figures) + "\n")
    return 0


def print_table(figures: dict) -> None:
    service, raw, naive = figures["service"], figures["raw"], figures["naive"]
    lines = [
        f"{'':<22}{'images/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'batch':>8}",
        f"{'fxserve':<22}{service['images_per_s']:>10}{service.get('p50_ms', '-'):>10}{service.get('p95_ms', '-'):>10}{service.get('p99_ms', '-'):>10}{service['mean_batch_size']:>8}",
        f"{'raw in-process':<22}{raw['images_per_s']:>10}{'-':>10}{'-':>10}{'-':>10}{raw['batch_size']:>8}",
        f"{'naive FastAPI + hooks':<22}{naive['images_per_s']:>10}{naive.get('p50_ms', '-'):>10}{naive.get('p95_ms', '-'):>10}{naive.get('p99_ms', '-'):>10}{'1':>8}",
        "",
        f"service / raw = {figures['ratio_service_to_raw']}, service / naive = {figures['ratio_service_to_naive']}",
        f"pruning: layer1 {figures['pruning']['layer1']} vs layer4 {figures['pruning']['layer4']} "
        f"(inference ratio {figures['pruning']['ratio_layer1_to_layer4_inference']})",
    ]
    for name in ("json", "base64", "safetensors"):
        entry = figures["encodings"][name]
        lines.append(f"encoding {name:<12} {entry['bytes']:>10} bytes  encode {entry['encode_ms']:>9} ms  request {entry['request_ms']:>8} ms")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

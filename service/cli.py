"""Command line: ``serve``, ``check``, ``nodes`` and ``prefetch``.

This is the entry point, so logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import socket
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import torch

from .config import ServiceConfig, load_config, resolve_config_path
from .errors import ConfigError
from .settings import Settings

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxserve", description="Serve torchvision intermediate features over HTTP.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="load the configured models and serve the HTTP API")
    serve.add_argument("--config", help="models.yaml path (default: $FXSERVE_CONFIG, else ./models.yaml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")

    check = commands.add_parser("check", help="validate a config without serving: schema, architectures, weights, nodes")
    check.add_argument("--config", help="models.yaml path (default: $FXSERVE_CONFIG, else ./models.yaml)")

    nodes = commands.add_parser("nodes", help="print the graph node names of a torchvision architecture")
    nodes.add_argument("architecture", help="a torchvision.models name such as resnet50, or package.module:callable")
    nodes.add_argument("--mode", choices=["eval", "train"], default="eval", help="graph to list (default: eval)")
    nodes.add_argument("--submodule", help="list the nodes of this submodule, e.g. backbone of a detection model")

    prefetch = commands.add_parser("prefetch", help="download or verify every configured weight into TORCH_HOME")
    prefetch.add_argument("--config", help="models.yaml path (default: $FXSERVE_CONFIG, else ./models.yaml)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format=_LOG_FORMAT)
    handlers = {"serve": _serve, "check": _check, "nodes": _nodes, "prefetch": _prefetch}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        logger.error("%s", exc.message)
        return 2
    except ValueError as exc:  # settings from the environment
        logger.error("%s", exc)
        return 2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app
    from .engine import Engine, configure_torch
    from .metrics import Metrics
    from .server import DrainingServer

    settings = Settings.from_env()
    api_keys = settings.load_api_keys()
    config_path, config = _load_config(args)
    try:
        listener = _bind(args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s port %d: %s; pick another --port or stop the process using it", args.host, args.port, exc.strerror or exc)
        return 1
    logger.info("serving %s from %s", ", ".join(config.models), config_path)
    configure_torch(settings)
    engine = Engine(config, settings, Metrics())

    if api_keys:
        logger.info("API keys are required on every path but /healthz, /readyz and /metrics (%d keys)", len(api_keys))
    server: DrainingServer | None = None

    def stop_server() -> None:
        if server is not None:
            server.stop_now()

    app = create_app(engine, on_fatal=stop_server, api_keys=api_keys)
    uvicorn_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )
    server = DrainingServer(uvicorn_config, engine)
    server.run(sockets=[listener])
    if engine.fatal_error is not None:
        return 1
    return 0


def _load_config(args: argparse.Namespace) -> tuple[Path, ServiceConfig]:
    """Load the config that ``--config`` or FXSERVE_CONFIG names; errors start with its path."""
    config_path = resolve_config_path(args.config)
    try:
        return config_path, load_config(config_path)
    except ConfigError as exc:
        exc.message = f"{config_path}: {exc.message}"
        raise


def _bind(host: str, port: int) -> socket.socket:
    """Open the listening socket before any model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only then,
    # and without it Nagle's algorithm adds about 40 ms to every response.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


def _check(args: argparse.Namespace) -> int:
    from .engine import resolve_device
    from .extractors import ExtractorSet
    from .loading import checkpoint_path_for, load_model, resolve_weights

    config_path, config = _load_config(args)
    failures = 0
    for name, model_config in config.models.items():
        try:
            resolve_device(name, model_config.device)
            loaded = load_model(name, model_config, random_init=True)
            extractors = ExtractorSet(name, loaded.module, model_config.layers, model_config.tracer, 1)
            extractors.validate_nodes()
            _warm_up_on_cpu(name, extractors, loaded.preprocessor.output_size, model_config.dtype)
            weights = resolve_weights(name, model_config)
        except ConfigError as exc:
            failures += 1
            logger.error("%s", exc.message)
            continue
        note = ""
        if isinstance(weights, Enum):
            cached = checkpoint_path_for(weights)
            if not cached.is_file():
                note = f"; weights NOT cached (expected at {cached}; run prefetch)"
            elif not _hash_matches(cached):
                failures += 1
                logger.error("model %s: %s does not match the SHA-256 prefix in its file name; delete it and run prefetch", name, cached)
                continue
            else:
                note = f"; weights cached and verified at {cached}"
        logger.info("model %s: OK (%s, layers %s%s)", name, model_config.architecture, ", ".join(model_config.layers), note)
    if failures:
        logger.error("%s: %d of %d models have errors", config_path, failures, len(config.models))
        return 1
    logger.info("%s: all %d models are valid", config_path, len(config.models))
    return 0


def _warm_up_on_cpu(name: str, extractors, size: tuple[int, int], dtype: str) -> None:
    """Run one image through every configured layer, as start-up does, on the CPU."""
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    extractors.module.to(dtypes[dtype])
    try:
        with torch.inference_mode():
            extractors.warm_up(torch.zeros(1, 3, *size, dtype=dtypes[dtype]))
    except ConfigError:
        raise
    except Exception as exc:  # any kernel or shape error, as in ModelRuntime.load
        raise ConfigError(name, "layers", f"the warm-up forward pass failed: {type(exc).__name__}: {exc}") from exc


def _nodes(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .extractors import ExtractorSet
    from .loading import load_model

    probe = ModelConfig(architecture=args.architecture, weights=None, layers=["x"], preprocess={"resize": [224, 224]}, submodule=args.submodule)
    loaded = load_model(args.architecture, probe, random_init=True)
    train, eval_ = ExtractorSet(args.architecture, loaded.module, {}, None, 1).node_names()
    sys.stdout.write("\n".join(eval_ if args.mode == "eval" else train) + "\n")
    return 0


def _prefetch(args: argparse.Namespace) -> int:
    from .loading import checkpoint_path_for, resolve_weights

    _, config = _load_config(args)
    failures = 0
    for name, model_config in config.models.items():
        weights = resolve_weights(name, model_config)
        if weights is None:
            logger.warning("model %s: weights is null; nothing to fetch", name)
            continue
        if isinstance(weights, Path):
            failures += not _verify_checkpoint(name, weights)
            continue
        failures += not _fetch_enum_weights(name, weights, checkpoint_path_for(weights))
    return 1 if failures else 0


def _verify_checkpoint(name: str, path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported, counted as a failure
        logger.error("model %s: checkpoint %s cannot be loaded with weights_only=True: %s", name, path, exc)
        return False
    logger.info("model %s: checkpoint %s loads", name, path)
    return True


def _fetch_enum_weights(name: str, weights: Enum, path: Path) -> bool:
    if not path.is_file():
        logger.info("model %s: downloading %s to %s", name, weights.value.url, path)
        try:
            torch.hub.load_state_dict_from_url(weights.value.url, progress=True, check_hash=True, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - network and hash errors; reported, counted
            logger.error("model %s: download of %s failed: %s. Put %s into %s by hand", name, weights.value.url, exc, path.name, path.parent)
            return False
    if not _hash_matches(path):
        digest = _sha256(path)
        logger.error(
            "model %s: %s has SHA-256 %s..., but its file name expects %s; delete it and run prefetch again",
            name, path, digest[:12], _hash_prefix(path.name),
        )
        return False
    logger.info("model %s: %s is present and verified", name, path)
    return True


def _hash_matches(path: Path) -> bool:
    """Compare a file with the SHA-256 prefix torchvision puts in weight file names."""
    expected = _hash_prefix(path.name)
    return expected is None or _sha256(path).startswith(expected)


def _hash_prefix(file_name: str) -> str | None:
    match = re.search(r"-([a-f0-9]{8,})\.", file_name)
    return match.group(1) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

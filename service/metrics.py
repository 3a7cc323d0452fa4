"""Prometheus metrics, all prefixed ``fxserve_`` and in base units.

Each ``Metrics`` object owns its registry, so tests and several apps in one process
do not collide. Labels are closed sets: configured model names, route templates,
status codes, rejection reasons and lifecycle states.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "LIFECYCLE_STATES"]

LIFECYCLE_STATES = ("loading", "ready", "draining", "stopped")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("fxserve_requests", "HTTP requests by endpoint, model and status code.", ["endpoint", "model", "status"], registry=registry)
        self.request_duration = Histogram("fxserve_request_duration_seconds", "Time from request start to response, by endpoint.", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.images = Counter("fxserve_images", "Images that went through a forward pass, by model.", ["model"], registry=registry)
        self.forward_duration = Histogram("fxserve_forward_duration_seconds", "Time of one batched forward pass including pooling and the copy to the host.", ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_images = Histogram("fxserve_batch_images", "Images per forward pass (the batch size).", ["model"], buckets=_BATCH_BUCKETS, registry=registry)
        self.batch_requests = Histogram("fxserve_batch_requests", "Requests that share one forward pass.", ["model"], buckets=_BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge("fxserve_queue_depth", "Images waiting for a forward pass, by model. The autoscaling signal.", ["model"], registry=registry)
        self.queue_wait = Histogram("fxserve_queue_wait_seconds", "Time an image waits in the queue before its forward pass.", ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.decode_duration = Histogram("fxserve_decode_duration_seconds", "Time to decode and preprocess one image.", ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.non_finite = Counter("fxserve_non_finite_values", "NaN or infinite output values sent to clients; JSON shows them as null.", ["model"], registry=registry)
        self.rejected = Counter("fxserve_rejected_requests", "Requests answered with an error, by model (empty if none applies) and reason.", ["model", "reason"], registry=registry)
        self.model_load = Gauge("fxserve_model_load_seconds", "Seconds it took to load, trace and warm up each model.", ["model"], registry=registry)
        self.model_ready = Gauge("fxserve_model_ready", "1 when the model serves requests, 0 while loading or after a failure.", ["model"], registry=registry)
        self.ready = Gauge("fxserve_ready", "1 in lifecycle state ready (models that failed under FXSERVE_ALLOW_FAILED_MODELS do not count), else 0.", registry=registry)
        self.lifecycle = Gauge("fxserve_lifecycle_state", "1 for the current lifecycle state, 0 for the others.", ["state"], registry=registry)
        self.worker_healthy = Gauge("fxserve_worker_healthy", "1 when the model's device worker thread is alive and not stalled.", ["model"], registry=registry)
        self.set_state("loading")

    def set_state(self, state: str) -> None:
        for known in LIFECYCLE_STATES:
            self.lifecycle.labels(state=known).set(1 if known == state else 0)
        self.ready.set(1 if state == "ready" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Pruned ``torch.fx`` feature extractors of one model, built on demand and cached.

A request for ``layer1`` must not pay for ``layer4``: ``create_feature_extractor``
drops every graph node the requested outputs do not depend on, so each distinct set
of nodes gets its own GraphModule. They share the model's parameters, so a cached
extractor costs a graph, not a copy of the weights.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .config import TracerConfig
from .errors import ConfigError, closest
from .loading import import_object

__all__ = ["LayerInfo", "ExtractorSet", "TRACE_LOCK"]

logger = logging.getLogger(__name__)


class _TraceLock:
    """Forward passes share it; ``torch.fx`` tracing takes it alone.

    While fx traces, it patches ``torch.nn.Module.__call__`` for the whole process,
    so a forward pass of another model's GraphModule in another thread fails with
    "module is not installed as a submodule". A waiting trace blocks new forward
    passes, so a steady stream of them cannot starve it.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._forwards = 0
        self._tracing = False
        self._traces_waiting = 0

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._condition:
            while self._tracing or self._traces_waiting:
                self._condition.wait()
            self._forwards += 1
        try:
            yield
        finally:
            with self._condition:
                self._forwards -= 1
                self._condition.notify_all()

    @contextmanager
    def trace(self) -> Iterator[None]:
        with self._condition:
            self._traces_waiting += 1
            while self._tracing or self._forwards:
                self._condition.wait()
            self._traces_waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._condition:
                self._tracing = False
                self._condition.notify_all()


TRACE_LOCK = _TraceLock()


@dataclass(frozen=True)
class LayerInfo:
    """A public layer: the graph node it reads, the entry of a dict output, its shape."""

    name: str
    node: str
    key: str | None
    shape: tuple[int, ...]
    dtype: str

    @property
    def elements_per_image(self) -> int:
        return math.prod(self.shape)


class ExtractorSet:
    """The model's extractors keyed by the set of graph nodes they return.

    ``extractor_for`` and ``run`` are called from the model's worker thread only;
    ``node_names`` may be called from any thread.
    """

    def __init__(self, model_name: str, module: nn.Module, layer_nodes: Mapping[str, str], tracer: TracerConfig | None, cache_size: int) -> None:
        self.model_name = model_name
        self.module = module
        self.layer_nodes = dict(layer_nodes)
        self.cache_size = cache_size
        self.tracer_kwargs, self.concrete_args = _tracer_options(model_name, tracer)
        self.layers: dict[str, LayerInfo] = {}
        self._cache: OrderedDict[frozenset[str], nn.Module] = OrderedDict()
        self._node_names: tuple[list[str], list[str]] | None = None
        self._lock = threading.Lock()

    def node_names(self) -> tuple[list[str], list[str]]:
        """Return ``(train, eval)`` node names from ``get_graph_node_names`` (traced once)."""
        with self._lock:
            if self._node_names is None:
                try:
                    with TRACE_LOCK.trace():
                        self._node_names = get_graph_node_names(
                            self.module, tracer_kwargs=self.tracer_kwargs, suppress_diff_warning=True, concrete_args=self.concrete_args
                        )
                except Exception as exc:  # fx raises many types for untraceable code
                    raise ConfigError(
                        self.model_name, "architecture", f"torch.fx cannot trace the model: {type(exc).__name__}: {exc}",
                        "Mark the offending modules as tracer.leaf_modules, wrap functions with tracer.autowrap_functions, "
                        "or serve a traceable part of it with submodule",
                    ) from exc
            return self._node_names

    def validate_nodes(self) -> None:
        """Raise ConfigError for a configured node that is not in the eval graph."""
        _, eval_nodes = self.node_names()
        for layer, node in self.layer_nodes.items():
            if not any(re.match(rf"^{re.escape(node)}(\.|$)", candidate) for candidate in eval_nodes):
                suggestions = closest(node, eval_nodes)
                hint = f"Closest valid nodes: {', '.join(suggestions)}" if suggestions else "List them with: python -m service nodes ARCH"
                raise ConfigError(self.model_name, f"layers.{layer}", f"node {node!r} is not in the graph", hint)

    def extractor_for(self, nodes: Iterable[str]) -> nn.Module:
        """Return the extractor pruned to ``nodes``, building and caching it if needed."""
        key = frozenset(nodes)
        extractor = self._cache.get(key)
        if extractor is not None:
            self._cache.move_to_end(key)
            return extractor
        with TRACE_LOCK.trace():
            extractor = create_feature_extractor(
                self.module,
                return_nodes={node: node for node in sorted(key)},
                tracer_kwargs=self.tracer_kwargs,
                suppress_diff_warning=True,
                concrete_args=self.concrete_args,
            ).eval()
        self._cache[key] = extractor
        if len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)
            logger.debug("model %s: evicted the extractor for %s", self.model_name, sorted(evicted))
        logger.debug("model %s: built an extractor for %s", self.model_name, sorted(key))
        return extractor

    def run(self, batch: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        """Run the extractor pruned to ``layers`` (public names) and return them by name."""
        infos = [self.layers[name] for name in layers]
        extractor = self.extractor_for(info.node for info in infos)
        with TRACE_LOCK.forward():
            outputs = extractor(batch)
        return {info.name: _select(outputs[info.node], info.key) for info in infos}

    def warm_up(self, batch: torch.Tensor) -> None:
        """Run every configured node once, record each layer's shape, expand dict outputs."""
        extractor = self.extractor_for(self.layer_nodes.values())
        with TRACE_LOCK.forward():
            outputs = extractor(batch)
        layers: dict[str, LayerInfo] = {}
        for name, node in self.layer_nodes.items():
            for key, tensor in _entries(self.model_name, name, outputs[node]):
                public = name if key is None else f"{name}.{key}"
                layers[public] = LayerInfo(public, node, key, tuple(tensor.shape[1:]), str(tensor.dtype).removeprefix("torch."))
        self.layers = layers

    def expand(self, configured: Iterable[str]) -> list[str]:
        """Map configured layer names to public ones: a dict-valued layer becomes its entries."""
        expanded: list[str] = []
        for name in configured:
            if name in self.layers:
                expanded.append(name)
            else:
                expanded.extend(public for public in self.layers if public.startswith(name + "."))
        return expanded


def _entries(model_name: str, layer: str, output: Any) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(output, torch.Tensor):
        return [(None, output)]
    if isinstance(output, Mapping):
        items = list(output.items())
    elif isinstance(output, (list, tuple)):
        items = list(enumerate(output))
    else:
        items = []
    if items and all(isinstance(value, torch.Tensor) for _, value in items):
        return [(str(key), value) for key, value in items]
    raise ConfigError(model_name, f"layers.{layer}", f"the node's output is {type(output).__name__}, not a tensor or a dict of tensors", "Pick another node")


def _select(output: Any, key: str | None) -> torch.Tensor:
    if key is None:
        return output
    if isinstance(output, Mapping):
        return output[key] if key in output else output[type(next(iter(output)))(key)]
    return output[int(key)]


def _tracer_options(model_name: str, tracer: TracerConfig | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if tracer is None:
        return None, None
    try:
        leaf_modules = [import_object(path) for path in tracer.leaf_modules]
        autowrap_functions = [import_object(path) for path in tracer.autowrap_functions]
    except (ImportError, AttributeError) as exc:
        raise ConfigError(model_name, "tracer", f"cannot import {exc}", "Use 'package.module:name' import paths") from None
    kwargs: dict[str, Any] = {}
    if leaf_modules:
        kwargs["leaf_modules"] = leaf_modules
    if autowrap_functions:
        kwargs["autowrap_functions"] = autowrap_functions
    return (kwargs or None), tracer.concrete_args

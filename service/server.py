"""A uvicorn server with a graceful drain on SIGTERM."""

from __future__ import annotations

import logging
import threading
from types import FrameType

import uvicorn

from .engine import Engine

__all__ = ["DrainingServer"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM or SIGINT drains instead of closing at once.

    Readiness turns off immediately. After ``shutdown_delay_s``, which gives load
    balancers time to stop sending traffic, uvicorn closes the listener and waits for
    the requests in flight. Then the app's lifespan finishes every queued image and
    the process exits 0. A second signal skips what is left of the delay but still
    drains. A third falls back to uvicorn's own handling: SIGINT stops without
    waiting, and the process ends by that signal (exit status 130 or 143).
    """

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self._signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 2:
            logger.info("received signal %d again: closing the listener now, still draining", sig)
            self.stop_now()
            return
        if self._signals > 2:
            super().handle_exit(sig, frame)
            return
        delay_s = self.engine.settings.shutdown_delay_s
        logger.info("received signal %d: readiness is off; the listener closes in %.1f s", sig, delay_s)
        self.engine.begin_drain()
        timer = threading.Timer(delay_s, self.stop_now)
        timer.daemon = True
        timer.start()

    def stop_now(self) -> None:
        """Ask uvicorn to stop; safe to call from any thread."""
        self.should_exit = True

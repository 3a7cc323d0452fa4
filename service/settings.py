"""Process-wide settings read from ``FXSERVE_*`` environment variables.

Per-model knobs (batch size, queue size, layers) live in models.yaml; these are the
limits and pools shared by every model. Defaults are documented in the README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

__all__ = ["Settings"]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Limits, thread pools and lifecycle timings.

    Every field can be set by the environment variable ``FXSERVE_<FIELD NAME IN CAPS>``.
    """

    # Request limits.
    max_images_per_request: int = 64
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Pixels of an image after the resize step and before the crop, a bound on the
    # memory a thin strip can make the resize allocate.
    max_resized_pixels: int = 40_000_000
    max_body_bytes: int = 200 * 1024 * 1024
    max_response_bytes: int = 512 * 1024 * 1024
    max_concurrent_requests: int = 256
    body_read_timeout_s: float = 30.0
    request_timeout_s: float = 60.0

    # Threads. 0 means "choose from the number of usable cores".
    decode_workers: int = 0
    torch_threads: int = 0

    # Lifecycle.
    shutdown_delay_s: float = 5.0
    drain_timeout_s: float = 30.0
    worker_stall_timeout_s: float = 120.0
    allow_failed_models: bool = False

    # Authentication: comma-separated bearer tokens, or a file with one per line.
    api_keys: str = field(default="", repr=False)
    api_keys_file: str = ""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            # Thread counts and the shutdown delay may be 0; every limit and timeout must be positive.
            minimum_ok = value >= 0 if spec.name in _ZERO_ALLOWED else value > 0
            if not minimum_ok:
                bound = "0 or more" if spec.name in _ZERO_ALLOWED else "more than 0"
                raise ValueError(f"FXSERVE_{spec.name.upper()}={value} is invalid; it must be {bound}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        """Build settings from ``FXSERVE_*`` variables; raise ValueError on a bad value."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for spec in fields(cls):
            name = f"FXSERVE_{spec.name.upper()}"
            if name not in environ:
                continue
            raw = environ[name].strip()
            values[spec.name] = _parse_value(name, raw, spec.type)
        return cls(**values)

    @property
    def resolved_decode_workers(self) -> int:
        return self.decode_workers or max(2, _cpu_count())

    @property
    def resolved_torch_threads(self) -> int:
        return self.torch_threads or _cpu_count()

    def load_api_keys(self) -> list[str]:
        """Return the configured bearer tokens; an empty list means auth is off.

        Raises ValueError when a key source is set but yields no key, because
        silently serving without auth is worse than not starting.
        """
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if self.api_keys_file:
            try:
                with open(self.api_keys_file, encoding="utf-8") as handle:
                    keys.extend(line.strip() for line in handle if line.strip() and not line.startswith("#"))
            except OSError as exc:
                raise ValueError(f"FXSERVE_API_KEYS_FILE={self.api_keys_file} cannot be read: {exc.strerror or exc}") from None
        if (self.api_keys or self.api_keys_file) and not keys:
            raise ValueError("FXSERVE_API_KEYS or FXSERVE_API_KEYS_FILE is set but contains no key; add keys or unset both to serve without auth")
        return keys


_ZERO_ALLOWED = frozenset({"decode_workers", "torch_threads", "shutdown_delay_s"})


def _parse_value(name: str, raw: str, type_name: object) -> object:
    type_name = str(type_name)
    try:
        if type_name == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {type_name}") from None
    return raw

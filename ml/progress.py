"""Progress for long steps, as log lines: readable in a terminal and in Airflow task logs alike."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("offerflow")


def setup_logging(level: int = logging.INFO) -> None:
    """CLI entry: log lines to stderr once (Airflow configures its own handlers)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def step(name: str) -> Iterator[dict]:
    """Log the start and the end of a step with its wall time and the peak RSS so far."""
    info: dict = {}
    log.info("%s ...", name)
    t0 = time.perf_counter()
    yield info
    info["seconds"] = time.perf_counter() - t0
    extra = f" ({info['detail']})" if "detail" in info else ""
    log.info("%s done in %.1f s, peak RSS %.0f MB%s", name, info["seconds"], peak_rss_mb(), extra)

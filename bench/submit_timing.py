"""Shared by benchmarks: record when a controller's submit (resolve, validate, queue) runs."""

from __future__ import annotations

import time
from typing import Any


def record_submits(controller: Any) -> list[tuple[float, float]]:
    """Wrap controller.submit; returns the list its (start, end) monotonic times go to."""
    spans: list[tuple[float, float]] = []
    real_submit = controller.submit

    def submit(request: Any, **options: Any) -> Any:
        t0 = time.monotonic()
        try:
            return real_submit(request, **options)
        finally:
            spans.append((t0, time.monotonic()))

    controller.submit = submit
    return spans

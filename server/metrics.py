"""A Prometheus exposition endpoint for the worker (text format 0.0.4, at /metrics).

Off by default; `attach(..., metrics_address="127.0.0.1:9108")` or
$LRCTL_METRICS_ADDRESS turns it on. It is the standard library's ThreadingHTTPServer on
a daemon thread: no dependency, and no grpc (a scrape never touches the gRPC server).

The metrics name parameters (selectors, and through the rates the job's structure), so
like the gRPC port it listens on loopback unless the caller consents with
`metrics_insecure` (check_metrics_bind). There is no authentication on it.

A scrape copies numbers under the controller's lock (Controller.metrics_snapshot:
O(groups + rate classes) and one memcpy) and formats them outside it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Sequence

from lrctl.common.addresses import HostPort, UnixPath, parse_address
from lrctl.server.controller import STEP_WINDOW
from lrctl.server.strategy import lr_value

log = logging.getLogger("lrctl.server")

ENV = "LRCTL_METRICS_ADDRESS"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (method, code) -> calls; lrctl.server.status.RequestCounts.snapshot.
RequestSnapshot = Callable[[], "dict[tuple[str, str], int]"]


def _is_loopback(host: str) -> bool:
    from lrctl.server.factory import is_loopback  # one definition of "loopback"

    return is_loopback(host)


def check_metrics_bind(address: str, insecure: bool, *, warn: bool = True) -> HostPort:
    """The endpoint `address` (host:port) names; refuses (ValueError) an address others
    can reach unless `insecure`, and (`warn`) warns on stderr when it is allowed that way."""
    try:
        endpoint = parse_address(address)
    except ValueError as exc:
        raise ValueError(f"metrics address: {exc}") from None
    if isinstance(endpoint, UnixPath):
        raise ValueError(f"metrics address {address!r} must be HOST:PORT (Prometheus scrapes over TCP)")
    if _is_loopback(endpoint.host):
        return endpoint
    if not insecure:
        raise ValueError(
            f"refusing to serve metrics on {address}: the endpoint has no authentication and "
            "its metrics reveal parameter names, selectors, rates and the training pace to "
            "anyone who reaches that address. Serve them on loopback (127.0.0.1:PORT) and let "
            "a local Prometheus or a proxy scrape them, or pass metrics_insecure=True "
            "(--metrics-insecure) if that address is private to you"
        )
    if warn:
        print(f"lrctl: WARNING: serving metrics WITHOUT authentication on {address}; anyone who "
              "can reach it sees parameter names and rates", file=sys.stderr, flush=True)
    return endpoint


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def steps_per_second(times: Sequence[float], now: float) -> float:
    """Steps per second over the recent steps' start times: the mean interval, or, when
    the last step is older than that window (training stalled), the count over the time
    since the window's first step, so the rate falls toward 0 while nothing steps."""
    if len(times) < 2:
        return 0.0
    span = times[-1] - times[0]
    if now - times[-1] > span:
        span = now - times[0]
    return (len(times) - 1) / span if span > 0 else 0.0


class _Family:
    """The lines of one metric family: HELP, TYPE, then its samples."""

    def __init__(self, out: list[str], name: str, kind: str, help_text: str) -> None:
        self._out, self._name = out, name
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    def sample(self, value: float, **labels: str) -> None:
        text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
        self._out.append(f"{self._name}{{{text}}} {_number(value)}" if text else f"{self._name} {_number(value)}")


class MetricsSource:
    """What one scrape reads: the controller, the selectors the user named (resolved to
    name positions once, at attach: names never change), and the server's call counts."""

    def __init__(self, controller: Any, selectors: Sequence[str] = (),
                 requests: RequestSnapshot | None = None) -> None:
        self.controller = controller
        self.selectors: list[tuple[str, Sequence[int]]] = []
        for selector in selectors:
            try:
                positions = controller.readable_positions(selector)
            except Exception as exc:  # NotFound / FailedPrecondition: a typo at attach
                raise ValueError(f"metrics selector {selector!r}: {exc}") from None
            self.selectors.append((selector, positions))
        self.requests = requests

    def render(self) -> str:
        """The whole exposition text."""
        snap = self.controller.metrics_snapshot()
        requests = self.requests() if self.requests is not None else None
        out: list[str] = []
        _Family(out, "lrctl_step", "gauge", "Index of the next optimizer step (steps lrctl has counted).") \
            .sample(snap.step)
        _Family(out, "lrctl_steps_per_second", "gauge",
                f"Optimizer steps per second over the latest (up to {STEP_WINDOW}) steps.") \
            .sample(steps_per_second(snap.step_times, snap.now))
        _Family(out, "lrctl_config_version", "gauge",
                "Config version: the number of changes applied in this run's lineage.").sample(snap.version)
        _Family(out, "lrctl_pending_changes", "gauge",
                "Accepted changes waiting for their step.").sample(snap.pending_changes)
        family = _Family(out, "lrctl_learning_rate", "gauge",
                         "Learning rate of each physical optimizer param group (by position).")
        for g, lr in enumerate(snap.group_lrs):
            family.sample(lr_value(lr), group=str(g))
        if self.selectors:
            self._selectors(out, snap)
        reported = self.controller.telemetry.last_values()
        if reported:
            family = _Family(out, "lrctl_reported", "gauge",
                             "The last value of each scalar the job reported (LRControl.report), by name.")
            for name in sorted(reported):
                family.sample(reported[name], metric=name)
        family = _Family(out, "lrctl_changes_total", "counter",
                         "Accepted changes recorded by this process: applied (OK) or failed at "
                         "their step (by gRPC status).")
        changes = {"OK": 0, **snap.changes}
        for status in sorted(changes, key=lambda s: (s != "OK", s)):
            family.sample(changes[status], status=status)
        if requests is not None:
            family = _Family(out, "lrctl_requests_total", "counter",
                             "gRPC calls answered by lrctl's handlers, by method and status code "
                             "(a change refused before it was queued counts here).")
            for (method, code), n in sorted(requests.items()):
                family.sample(n, method=method, code=code)
        return "\n".join(out) + "\n"

    def _selectors(self, out: list[str], snap: Any) -> None:
        rates, class_of = snap.rates, snap.class_of
        stats = []
        for selector, positions in self.selectors:  # per-name work, outside the lock
            per_class = Counter([class_of[i] for i in positions])
            values = {c: rates[c] for c in per_class if c in rates}
            if not values:
                stats.append((selector, float("nan"), float("nan"), float("nan")))
                continue
            low, high = min(values.values()), max(values.values())
            if low == high:
                mean = low
            else:
                n = sum(per_class[c] for c in values)
                mean = sum(values[c] * per_class[c] for c in values) / n
            stats.append((selector, mean, low, high))
        for suffix, k, what in (("", 1, "the rate all its names share, else their mean"),
                                ("_min", 2, "the smallest rate of its names"),
                                ("_max", 3, "the largest rate of its names")):
            family = _Family(out, f"lrctl_learning_rate_selector{suffix}", "gauge",
                             f"Per selector named at attach (metrics_selectors): {what}, for the next step.")
            for row in stats:
                family.sample(row[k], selector=row[0])


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._send(404, "text/plain; charset=utf-8", b"not found: lrctl serves /metrics\n")
            return
        try:
            body = self.server.source.render().encode()
        except Exception as exc:  # a bug must cost the scrape, never the job
            log.exception("lrctl: rendering metrics failed")
            self._send(500, "text/plain; charset=utf-8", f"lrctl: metrics failed: {exc!r}\n".encode())
            return
        self._send(200, CONTENT_TYPE, body)

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds must not fill the job's stderr


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    source: MetricsSource


class MetricsServer:
    """The started endpoint; `address` has the bound port. stop() is idempotent."""

    def __init__(self, address: str, source: MetricsSource, *, insecure: bool = False) -> None:
        endpoint = check_metrics_bind(address, insecure)
        server_class = type("_Server", (_HTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET})
        try:
            self._httpd = server_class((endpoint.host, endpoint.port), _Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc} "
                          "(is the port already in use?)") from None
        self._httpd.source = source
        self.host = endpoint.host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="lrctl-metrics", daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def address(self) -> str:
        return str(HostPort(self.host, self.port))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def from_env(address: str | None) -> str | None:
    """The metrics address to use: `address` if given ("" = off), else $LRCTL_METRICS_ADDRESS."""
    if address is None:
        address = os.environ.get(ENV) or None
    return address or None


__all__: Iterable[str] = ("MetricsServer", "MetricsSource", "check_metrics_bind", "escape_label")

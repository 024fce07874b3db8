"""Every Prometheus metric pointgate exports, defined once, on its own registry.

Naming follows the Prometheus guide: one ``pointgate_`` prefix, base units (``_seconds``), ``_total``
for counters, ``_info`` for build metadata. No label ever holds a product or device id: those are
unbounded, and per-device detail belongs in the logs (``service.ops.logs``), not in a time series.

``REGISTRY`` is ours rather than prometheus-client's global one, so tests can read exact values and
nothing a library registers globally leaks onto ``/metrics``. The process and platform collectors
are added to it explicitly.

With ``serve --workers N`` each worker runs in prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set by the supervisor before the worker starts): counters and histograms add up across workers, and each gauge
says how (``multiprocess_mode``: connected devices and queued points are summed over live workers). The
supervisor serves them through `SupervisorMetrics`, with its own process metrics and the worker gauges.
"""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

from service import __version__

__all__ = [
    "ACL_ACTIONS",
    "ACL_DENIALS",
    "API_NAMES",
    "AUTH_FAILURES",
    "AUTH_FAILURE_REASONS",
    "BUILD_INFO",
    "CONNECTED_DEVICES",
    "DRAINING",
    "EVENTS_WRITTEN",
    "LIMIT_HITS",
    "LIMIT_NAMES",
    "MESSAGES",
    "MESSAGE_OUTCOMES",
    "MODELS_LOADED",
    "POINTS_WRITTEN",
    "PROTOCOL_VIOLATIONS",
    "REGISTRY",
    "REPLIES",
    "REQUESTS",
    "SUB_DEVICES_ONLINE",
    "WRITE_BATCH_POINTS",
    "WRITE_ERRORS",
    "WRITE_ERROR_REASONS",
    "WRITE_QUEUE_POINTS",
    "WRITE_SECONDS",
    "AclAction",
    "ApiName",
    "AuthFailureReason",
    "LimitName",
    "MessageOutcome",
    "SupervisorMetrics",
    "WriteErrorReason",
    "render",
]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# The closed sets of label values, each defined once: the Literal types the callers are checked against
# (mypy), and the tuples derived from them that pre-create every series at 0.
ApiName = Literal["resume", "resume_batch", "post", "post_batch", "event"]
MessageOutcome = Literal["accepted", "rejected", "failed"]
WriteErrorReason = Literal["connection", "data", "other"]
AuthFailureReason = Literal[
    # the CONNECT is not an EnOS login (service.errors.LoginRefusalReason, a subset of this set)
    "malformed",
    "unsupported_secure_mode",
    "unsupported_sign_method",
    # the login is, but the registry says no (service.devices.auth)
    "bad_signature",
    "unknown_device",
    "disabled",
    # secure mode 3: activation is off for the product (or it has no secret), or the device already has one
    "activation_disabled",
    "already_activated",
    "anonymous_refused",
    "unavailable",
    # the CONNECT's Will names a topic the device may not publish on (service.broker.overrides)
    "will_topic_denied",
]
# No "client_cert_required": with tls_client_cafile set, the TLS handshake itself refuses a device without
# a certificate, before any CONNECT, so no login check ever sees (or could count) that case.
AclAction = Literal["publish", "subscribe"]

API_NAMES: tuple[ApiName, ...] = get_args(ApiName)
MESSAGE_OUTCOMES: tuple[MessageOutcome, ...] = get_args(MessageOutcome)
WRITE_ERROR_REASONS: tuple[WriteErrorReason, ...] = get_args(WriteErrorReason)
AUTH_FAILURE_REASONS: tuple[AuthFailureReason, ...] = get_args(AuthFailureReason)
ACL_ACTIONS: tuple[AclAction, ...] = get_args(AclAction)

# --- messages and replies -------------------------------------------------------------------------
MESSAGES = Counter(
    "pointgate_messages_total",
    "Measurement-point and event requests handled, by API, outcome (accepted, rejected: the device's fault, "
    "failed: ours) and the reply code sent.",
    ["api", "outcome", "code"],
    registry=REGISTRY,
)
REPLIES = Counter(
    "pointgate_replies_total",
    "Replies published on _reply topics, by reply code.",
    ["code"],
    registry=REGISTRY,
)

REQUESTS = Counter(
    "pointgate_requests_total",
    "Requests other than measurement points (topology, sub-device sessions, unserved topics), by route and the"
    " reply code sent.",
    ["route", "code"],
    registry=REGISTRY,
)

# --- storage --------------------------------------------------------------------------------------
EVENTS_WRITTEN = Counter(
    "pointgate_events_written_total",
    "Device events committed to PostgreSQL.",
    registry=REGISTRY,
)
POINTS_WRITTEN = Counter(
    "pointgate_points_written_total",
    "Measurement points committed to PostgreSQL.",
    registry=REGISTRY,
)
WRITE_BATCH_POINTS = Histogram(
    "pointgate_write_batch_points",
    "Points per committed write batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000),
    registry=REGISTRY,
)
WRITE_SECONDS = Histogram(
    "pointgate_write_seconds",
    "Time to write and commit one batch, in seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
WRITE_ERRORS = Counter(
    "pointgate_write_errors_total",
    "Failed write attempts, by reason: connection (retried), data (rejected rows), other.",
    ["reason"],
    registry=REGISTRY,
)
WRITE_QUEUE_POINTS = Gauge(
    "pointgate_write_queue_points",
    "Points accepted from devices and waiting to be committed.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)

# --- devices --------------------------------------------------------------------------------------
CONNECTED_DEVICES = Gauge(
    "pointgate_connected_devices",
    "Devices with an open, authenticated MQTT connection.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
SUB_DEVICES_ONLINE = Gauge(
    "pointgate_sub_devices_online",
    "Sub-devices logged in through a gateway connection (combine.login).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
AUTH_FAILURES = Counter(
    "pointgate_auth_failures_total",
    "Refused MQTT logins, by reason.",
    ["reason"],
    registry=REGISTRY,
)
ACL_DENIALS = Counter(
    "pointgate_acl_denials_total",
    "Publishes and subscriptions refused because the topic is not the device's own, by action.",
    ["action"],
    registry=REGISTRY,
)

# --- per-connection limits (issue 8) ------------------------------------------------------------------
LimitName = Literal[
    "subscriptions",
    "wildcard_subscriptions",
    "queued_bytes",
    "qos2_inflight",
    "qos2_request",
    "session_expiry",
]
LIMIT_NAMES: tuple[LimitName, ...] = get_args(LimitName)
LIMIT_HITS = Counter(
    "pointgate_limit_hits_total",
    "Devices past a per-connection limit (disconnected; session_expiry: persistent sessions dropped).",
    ["limit"],
    registry=REGISTRY,
)
PROTOCOL_VIOLATIONS = Counter(
    "pointgate_protocol_violations_total",
    "Connections closed for breaking MQTT 3.1.1 (malformed packets, packets a client may not send).",
    registry=REGISTRY,
)

# --- service state --------------------------------------------------------------------------------
MODELS_LOADED = Gauge(
    "pointgate_models_loaded",
    "Thing models compiled and in use.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "pointgate_build_info",
    "Always 1; the version label says which pointgate is running.",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
DRAINING = Gauge(
    "pointgate_draining",
    "1 once shutdown has begun and the service is draining, else 0.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)

BUILD_INFO.labels(version=__version__).set(1)
# Known label values start at 0, so rate() and absent() work before the first event.
for _auth_reason in AUTH_FAILURE_REASONS:
    AUTH_FAILURES.labels(reason=_auth_reason)
for _write_reason in WRITE_ERROR_REASONS:
    WRITE_ERRORS.labels(reason=_write_reason)
for _action in ACL_ACTIONS:
    ACL_DENIALS.labels(action=_action)
for _limit in LIMIT_NAMES:
    LIMIT_HITS.labels(limit=_limit)


def render() -> tuple[bytes, str]:
    """The body and Content-Type of a ``/metrics`` response (Prometheus text format)."""
    # generate_latest writes the classic text format; announce it as 0.0.4, which every Prometheus
    # and every scraper understands (our names need none of the 1.0.0 escaping).
    return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4


class SupervisorMetrics:
    """``/metrics`` of ``serve --workers N``: the workers' metrics added up, plus the supervisor's own.

    Built only in the supervisor: a metric defined at import time would also be written by every worker.
    """

    def __init__(self, multiprocess_dir: str, workers: int) -> None:
        self.registry = registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.workers_running = Gauge(
            "pointgate_workers", "Worker processes running (serve --workers N).", registry=registry
        )
        self.worker_restarts = Counter(
            "pointgate_worker_restarts_total", "Workers restarted after they died.", registry=registry
        )
        self.worker_devices = Gauge(
            "pointgate_worker_connected_devices",
            "Devices connected to each worker (the kernel spreads connections over the workers).",
            ["worker"],
            registry=registry,
        )
        for index in range(workers):
            self.worker_devices.labels(worker=str(index))

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of a ``/metrics`` response."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

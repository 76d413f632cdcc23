"""Every Prometheus metric of the operator, prefixed ``graft_``, with bounded label sets."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "graft_reconciles_total", "Reconcile passes by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "graft_reconcile_duration_seconds",
    "Time spent in one reconcile pass.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESOURCES_BY_PHASE = Gauge(
    "graft_resources",
    "Custom resources seen by this operator, by kind and phase.",
    ["kind", "phase"],
)
JOB_RESTARTS = Counter(
    "graft_finetunejob_restarts_total", "Gang restarts after a retryable failure.", ["reason"]
)
FAILURE_DETECTION_SECONDS = Histogram(
    "graft_finetunejob_failure_detection_seconds",
    "From the failure's own timestamp (node condition, pod finish) to the operator noticing it.",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300),
)
RECOVERY_SECONDS = Histogram(
    "graft_finetunejob_recovery_seconds",
    "From noticing a failure to every rank of the new attempt running.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
GPU_HOURS = Counter(
    "graft_finetunejob_gpu_hours_total", "GPU-hours used by finished attempts.", ["node_pool"]
)

_phases: dict[tuple[str, str], str] = {}


def observe_phase(kind: str, key: str, phase: str | None) -> None:
    """Record ``key``'s current phase (None: deleted) and refresh the by-phase gauge."""
    old = _phases.pop((kind, key), None)
    if old is not None:
        RESOURCES_BY_PHASE.labels(kind, old).dec()
    if phase is not None:
        _phases[(kind, key)] = phase
        RESOURCES_BY_PHASE.labels(kind, phase).inc()


def serve(port: int) -> None:
    if port:
        start_http_server(port)

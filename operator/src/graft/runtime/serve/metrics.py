"""Serving metrics, recorded through ray.serve.metrics so Ray's own exporter publishes them.

Ray exports them on each node's metrics port (8080 in KubeRay pods) with a ``ray_``
prefix, e.g. ``ray_graft_serve_requests_total``. Labels are bounded: ``model`` is the
served name, a loaded adapter, or ``unknown``; ``route`` and ``status`` are small sets.
"""

from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def _tags(*keys: str) -> Any:
    # Ray annotates tag_keys as a one-element tuple; any tuple of names is accepted.
    return keys


class Metrics:
    """Counters and histograms for one replica; construct only inside a Ray worker."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests: Any = metrics.Counter(
            "graft_serve_requests_total",
            description="OpenAI API requests, by model, route and HTTP status.",
            tag_keys=_tags("model", "route", "status"),
        )
        self.prompt_tokens: Any = metrics.Counter(
            "graft_serve_prompt_tokens_total",
            description="Prompt tokens processed.",
            tag_keys=_tags("model"),
        )
        self.completion_tokens: Any = metrics.Counter(
            "graft_serve_completion_tokens_total",
            description="Tokens generated.",
            tag_keys=_tags("model"),
        )
        self.latency: Any = metrics.Histogram(
            "graft_serve_request_latency_seconds",
            description="Time from request to last token.",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=_tags("model", "route"),
        )
        self.ttft: Any = metrics.Histogram(
            "graft_serve_time_to_first_token_seconds",
            description="Time from request to first generated text.",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=_tags("model", "route"),
        )

    def request_done(
        self, *, model: str, route: str, status: int, latency_s: float | None = None
    ) -> None:
        self.requests.inc(1, tags={"model": model, "route": route, "status": str(status)})
        if latency_s is not None:
            self.latency.observe(latency_s, tags={"model": model, "route": route})

    def first_token(self, *, model: str, route: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model, "route": route})

    def tokens(self, *, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt, tags={"model": model})
        if completion:
            self.completion_tokens.inc(completion, tags={"model": model})

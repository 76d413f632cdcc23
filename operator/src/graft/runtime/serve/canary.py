"""Adapter canaries inside a replica: which version answers a request, and when to roll back.

An adapter ``support`` with a canary is loaded twice in the engine: the stable version as
``support`` and the new one as ``support@canary`` (``@`` cannot appear in an adapter name a
client may use). For every request for ``support`` the :class:`CanaryRouter` picks the
version so that exactly ``weight`` requests in 100 go to the new one, records how each
request ended, and rolls the canary back on this replica as soon as :func:`judge` finds it
worse than the stable version over the window. The operator reads :meth:`CanaryRouter.report`
from ``/readyz`` and makes the rollback stick (docs/modelservice.md, "Canaries").

Everything here is plain Python with the clock passed in, so it is tested without Ray.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

SUFFIX = "@canary"
LOAD_FAILED = "the new version failed to load; see the replica's log"


def engine_name(adapter: str) -> str:
    """The engine's name for the new version of ``adapter``."""
    return f"{adapter}{SUFFIX}"


def is_internal(name: str) -> bool:
    return name.endswith(SUFFIX)


class CanaryArg(BaseModel):
    """An adapter's ``canary`` in the deployment's user_config (see serve_config.py)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    uri: str = Field(min_length=1)
    version: str = Field(min_length=1, max_length=64)
    weight: int = Field(ge=0, le=100)
    window_seconds: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=20, ge=1)
    max_error_rate_increase: float = Field(default=0.05, ge=0)
    max_p99_latency_ratio: float = Field(default=1.5, ge=1)


@dataclass(frozen=True)
class Stats:
    """Requests of one version in the window."""

    requests: int = 0
    errors: int = 0
    p99_s: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "errorRate": round(self.error_rate, 4),
            "p99Seconds": round(self.p99_s, 4),
        }


def p99(latencies: Iterable[float]) -> float:
    xs = sorted(latencies)
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]


@dataclass
class Window:
    """Outcomes of the last ``seconds``: (time, ok, latency)."""

    seconds: float
    items: deque[tuple[float, bool, float]] = field(default_factory=deque)

    def add(self, now: float, ok: bool, latency_s: float) -> None:
        self.items.append((now, ok, latency_s))
        self._trim(now)

    def stats(self, now: float) -> Stats:
        self._trim(now)
        return Stats(
            requests=len(self.items),
            errors=sum(1 for _, ok, _ in self.items if not ok),
            # Latency of failed requests says nothing about the version's speed.
            p99_s=p99(lat for _, ok, lat in self.items if ok),
        )

    def _trim(self, now: float) -> None:
        while self.items and self.items[0][0] < now - self.seconds:
            self.items.popleft()


def judge(stable: Stats, canary: Stats, arg: CanaryArg) -> str | None:
    """Why the canary must be rolled back, or None while it does well enough (or has too
    few requests in the window to tell)."""
    if canary.requests < arg.min_requests:
        return None
    increase = canary.error_rate - stable.error_rate
    if increase > arg.max_error_rate_increase:
        return (
            f"error rate {canary.error_rate:.1%} over {canary.requests} requests vs "
            f"{stable.error_rate:.1%} over {stable.requests} for the stable version "
            f"(allowed: +{arg.max_error_rate_increase:.1%})"
        )
    ok_canary = canary.requests - canary.errors
    ok_stable = stable.requests - stable.errors
    if (
        ok_canary >= arg.min_requests
        and ok_stable >= arg.min_requests
        and stable.p99_s > 0
        and canary.p99_s > arg.max_p99_latency_ratio * stable.p99_s
    ):
        return (
            f"p99 latency {canary.p99_s:.3f}s vs {stable.p99_s:.3f}s for the stable version "
            f"({canary.p99_s / stable.p99_s:.2f}x; allowed: {arg.max_p99_latency_ratio:g}x)"
        )
    return None


def takes_canary(n: int, weight: int) -> bool:
    """Whether the ``n``-th request (from 1) goes to the canary: exactly ``weight`` of every
    100 consecutive requests do, spread evenly rather than in a block."""
    return (n * weight) // 100 > ((n - 1) * weight) // 100


@dataclass
class Canary:
    """One adapter's canary on this replica."""

    arg: CanaryArg
    stable: Window
    canary: Window
    requests: int = 0
    rolled_back: str | None = None

    @classmethod
    def new(cls, arg: CanaryArg) -> Canary:
        return cls(arg, Window(arg.window_seconds), Window(arg.window_seconds))

    def pick(self) -> bool:
        if self.rolled_back is not None:
            return False
        self.requests += 1
        return takes_canary(self.requests, self.arg.weight)

    def record(self, to_canary: bool, ok: bool, latency_s: float, now: float) -> None:
        (self.canary if to_canary else self.stable).add(now, ok, latency_s)
        if self.rolled_back is None:
            self.rolled_back = judge(self.stable.stats(now), self.canary.stats(now), self.arg)

    def report(self, now: float) -> dict[str, Any]:
        return {
            "version": self.arg.version,
            "weight": 0 if self.rolled_back else self.arg.weight,
            "state": "RolledBack" if self.rolled_back else "Progressing",
            "reason": self.rolled_back,
            "stable": self.stable.stats(now).as_dict(),
            "canary": self.canary.stats(now).as_dict(),
        }


@dataclass(frozen=True)
class Route:
    """Where one request for an adapter goes."""

    adapter: str
    engine_adapter: str
    to_canary: bool


class CanaryRouter:
    """The canaries of one replica, kept across reconfigures while their version stays."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._canaries: dict[str, Canary] = {}

    def configure(self, wanted: Mapping[str, CanaryArg | None], failed: Iterable[str]) -> None:
        """Canaries for the adapters of the new user_config; ``failed`` are engine adapter
        names that did not load (a canary among them is rolled back at once)."""
        failed = set(failed)
        kept: dict[str, Canary] = {}
        for name, arg in wanted.items():
            if arg is None:
                continue
            old = self._canaries.get(name)
            if old is not None and old.arg.version == arg.version:
                old.arg = arg
                old.stable.seconds = old.canary.seconds = arg.window_seconds
                c = old
            else:
                c = Canary.new(arg)
            if engine_name(name) in failed and c.rolled_back is None:
                c.rolled_back = LOAD_FAILED
            kept[name] = c
        self._canaries = kept

    def route(self, adapter: str) -> Route:
        c = self._canaries.get(adapter)
        to_canary = c is not None and c.pick()
        return Route(adapter, engine_name(adapter) if to_canary else adapter, to_canary)

    def record(self, route: Route, *, ok: bool, latency_s: float) -> None:
        c = self._canaries.get(route.adapter)
        if c is not None:
            c.record(route.to_canary, ok, latency_s, self._clock())

    def report(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {name: c.report(now) for name, c in sorted(self._canaries.items())}

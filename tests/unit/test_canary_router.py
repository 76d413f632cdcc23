"""The canary router and judge inside a replica (pure; the clock is passed in)."""

from __future__ import annotations

import itertools

import pytest

from graft.runtime.serve.canary import (
    LOAD_FAILED,
    CanaryArg,
    CanaryRouter,
    Stats,
    Window,
    engine_name,
    judge,
    p99,
    takes_canary,
)


def arg(weight: int = 10, version: str = "v2", **kw: float) -> CanaryArg:
    return CanaryArg.model_validate(
        {"uri": f"file:///a/{version}", "version": version, "weight": weight, **kw}
    )


@pytest.mark.parametrize("weight", [0, 1, 10, 33, 50, 99, 100])
def test_exactly_weight_in_every_hundred_and_spread(weight: int) -> None:
    picks = [takes_canary(n, weight) for n in range(1, 401)]
    for block in range(4):
        assert sum(picks[block * 100 : (block + 1) * 100]) == weight
    if 0 < weight <= 50:
        # spread: never two canary requests in a row below half
        assert not any(a and b for a, b in itertools.pairwise(picks))


@pytest.mark.parametrize(
    ("stable", "canary", "rolled", "words"),
    [
        (Stats(100, 0, 0.1), Stats(19, 19, 0.0), False, ""),  # too few canary requests
        (Stats(100, 0, 0.1), Stats(20, 1, 0.1), False, ""),  # +5.0%: at the margin
        (Stats(100, 0, 0.1), Stats(20, 2, 0.1), True, "error rate 10.0%"),
        (Stats(100, 10, 0.1), Stats(20, 3, 0.1), False, ""),  # 15% vs 10%: within 5 points
        (Stats(0, 0, 0.0), Stats(20, 20, 0.0), True, "error rate 100.0%"),  # no stable traffic
        (Stats(100, 0, 0.1), Stats(20, 0, 0.16), True, "p99 latency"),
        (Stats(100, 0, 0.1), Stats(20, 0, 0.15), False, ""),  # 1.5x allowed
        (Stats(10, 0, 0.1), Stats(20, 0, 1.0), False, ""),  # too few stable requests
    ],
)
def test_judge(stable: Stats, canary: Stats, rolled: bool, words: str) -> None:
    why = judge(stable, canary, arg())
    assert (why is not None) == rolled
    if rolled:
        assert why is not None and words in why


def test_window_forgets_old_requests_and_p99_ignores_errors() -> None:
    w = Window(10.0)
    w.add(0.0, False, 9.0)
    for t in range(1, 6):
        w.add(float(t), True, 0.1 * t)
    assert w.stats(5.0) == Stats(6, 1, 0.5)
    assert w.stats(10.5).requests == 5  # the failure at t=0 left the window
    assert p99([]) == 0.0 and p99([3.0, 1.0, 2.0]) == 3.0


def test_router_splits_records_and_rolls_back_a_failing_canary() -> None:
    now = [0.0]
    r = CanaryRouter(clock=lambda: now[0])
    r.configure({"support": arg(weight=50, minRequests=5), "other": None}, failed=[])
    assert r.route("other").engine_adapter == "other"
    routes = [r.route("support") for _ in range(10)]
    assert sum(x.to_canary for x in routes) == 5
    assert {x.engine_adapter for x in routes} == {"support", engine_name("support")}
    for x in routes:
        now[0] += 0.1
        r.record(x, ok=not x.to_canary, latency_s=0.05)
    rep = r.report()["support"]
    assert rep["state"] == "RolledBack" and rep["weight"] == 0
    assert "error rate 100.0%" in rep["reason"]
    assert rep["canary"]["errors"] == 5 and rep["stable"]["requests"] == 5
    # rolled back: every request goes to the stable version, across a reconfigure of the
    # same version; a new version starts afresh
    assert not any(r.route("support").to_canary for _ in range(20))
    r.configure({"support": arg(weight=50, minRequests=5)}, failed=[])
    assert r.report()["support"]["state"] == "RolledBack"
    r.configure({"support": arg(weight=50, version="v3")}, failed=[])
    assert r.report()["support"]["state"] == "Progressing"
    assert sum(r.route("support").to_canary for _ in range(10)) == 5


def test_a_canary_that_does_not_load_is_rolled_back_at_once() -> None:
    r = CanaryRouter(clock=lambda: 0.0)
    r.configure({"support": arg(weight=100)}, failed=[engine_name("support")])
    assert r.report()["support"]["reason"] == LOAD_FAILED
    assert not r.route("support").to_canary


def test_removed_canary_is_forgotten() -> None:
    r = CanaryRouter(clock=lambda: 0.0)
    r.configure({"support": arg()}, failed=[])
    r.configure({"support": None}, failed=[])
    assert r.report() == {}
    assert r.route("support").engine_adapter == "support"

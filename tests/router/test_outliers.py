"""Outlier ejection (fdcore.router.outliers) under a fake clock: every branch, exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdcore.config import OutlierConfig, load_router_config
from fdcore.errors import StartupError
from fdcore.router.outliers import OutlierDetector, allowed_ejections
from fdcore.types import Instance, Outcome, Role


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(n: int) -> tuple[Instance, ...]:
    return tuple(Instance(f"http://10.0.0.{i}:80", Role.MIXED, f"10.0.0.{i}", 80, 80)
                 for i in range(n))


def detector(**options: Any) -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    config = OutlierConfig.model_validate({
        "consecutive-failures": 3, "base-ejection-secs": 10, "max-ejection-secs": 25,
        "max-ejection-percent": 50, **options,
    })
    return OutlierDetector(config, clock), clock


def fail(d: OutlierDetector, instance: Instance, peers: tuple[Instance, ...], times: int) -> list[bool]:
    return [d.record(instance, Outcome.ERROR, peers) for _ in range(times)]


def test_consecutive_failures_eject_for_the_base_time() -> None:
    d, clock = detector()
    peers = pool(2)
    a = peers[0]
    assert fail(d, a, peers, 3) == [False, False, True]
    assert d.status(a.url) == {"circuit": "open", "ejected_until": 1010.0, "ejections": 1,
                               "consecutive_failures": 0}
    assert d.admit(peers) == (peers[1],)
    clock.now = 1009.999
    assert d.is_ejected(a.url)
    clock.now = 1010.0
    assert not d.is_ejected(a.url)
    assert d.admit(peers) == peers
    assert d.status(a.url)["circuit"] == "closed"
    assert d.status(a.url)["ejected_until"] is None


def test_ejection_time_grows_with_each_ejection_up_to_the_max() -> None:
    d, clock = detector()
    peers = pool(2)
    a = peers[0]
    durations = []
    for _ in range(4):
        start = clock.now
        assert fail(d, a, peers, 3)[-1]
        durations.append(d.breaker(a.url).ejected_until - start)
        clock.now = d.breaker(a.url).ejected_until
    assert durations == [10.0, 20.0, 25.0, 25.0]
    assert d.status(a.url)["ejections"] == 4


def test_a_success_resets_the_count_and_4xx_count_as_success() -> None:
    d, _ = detector()
    peers = pool(2)
    a = peers[0]
    fail(d, a, peers, 2)
    assert not d.record(a, Outcome.SUCCESS, peers)
    assert d.breaker(a.url).consecutive_failures == 0
    assert fail(d, a, peers, 2) == [False, False]
    assert not d.is_ejected(a.url)


def test_timeouts_and_disconnects_do_not_count() -> None:
    d, _ = detector()
    peers = pool(2)
    a = peers[0]
    d.record(a, Outcome.ERROR, peers)
    for _ in range(10):
        d.record(a, Outcome.TIMEOUT, peers)
        d.record(a, Outcome.DISCONNECT, peers)
    assert d.breaker(a.url).consecutive_failures == 1
    assert not d.is_ejected(a.url)


def test_outcomes_while_ejected_are_ignored() -> None:
    d, clock = detector()
    peers = pool(2)
    a = peers[0]
    fail(d, a, peers, 3)
    until = d.breaker(a.url).ejected_until
    assert fail(d, a, peers, 5) == [False] * 5
    assert not d.record(a, Outcome.SUCCESS, peers)
    assert d.breaker(a.url).ejected_until == until
    assert d.breaker(a.url).consecutive_failures == 0
    clock.now = until
    # Back in selection with a clean count: it needs the full threshold again.
    assert fail(d, a, peers, 3) == [False, False, True]


def test_the_cap_holds_back_an_ejection_until_another_returns() -> None:
    d, clock = detector()
    peers = pool(2)
    a, b = peers
    assert fail(d, a, peers, 3)[-1]
    # 50 % of two: one at a time; b stays in selection however often it fails.
    assert fail(d, b, peers, 4) == [False] * 4
    assert d.breaker(b.url).consecutive_failures == 4
    assert d.admit(peers) == (b,)
    clock.now = d.breaker(a.url).ejected_until
    assert d.record(b, Outcome.ERROR, peers)
    assert d.admit(peers) == (a,)


def test_the_last_instance_of_a_role_is_never_ejected_below_100_percent() -> None:
    d, _ = detector(**{"max-ejection-percent": 99})
    (only,) = pool(1)
    assert fail(d, only, (only,), 10) == [False] * 10
    assert d.admit((only,)) == (only,)


def test_fail_open_when_every_candidate_is_ejected() -> None:
    d, _ = detector(**{"max-ejection-percent": 100})
    peers = pool(2)
    for instance in peers:
        assert fail(d, instance, peers, 3)[-1]
    assert all(d.is_ejected(i.url) for i in peers)
    assert d.admit(peers) == peers


def test_an_instance_outside_the_pool_still_counts_itself() -> None:
    d, _ = detector()
    peers = pool(3)
    # peers[0] was taken out by health checks: the cap is computed over the two left plus it.
    assert fail(d, peers[0], peers[1:], 3)[-1]


def test_disabled_never_ejects() -> None:
    d, _ = detector(enabled=False)
    peers = pool(2)
    assert fail(d, peers[0], peers, 20) == [False] * 20
    assert d.admit(peers) == peers


def test_forget_drops_the_breaker() -> None:
    d, _ = detector()
    peers = pool(2)
    fail(d, peers[0], peers, 3)
    d.forget(peers[0].url)
    assert not d.is_ejected(peers[0].url)
    assert d.status(peers[0].url)["ejections"] == 0


@pytest.mark.parametrize(("n", "percent", "expected"), [
    (1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (10, 10, 1), (2, 10, 1), (3, 0, 0),
    (1, 100, 1), (3, 100, 3), (5, 99, 4),
])
def test_allowed_ejections(n: int, percent: int, expected: int) -> None:
    assert allowed_ejections(n, percent) == expected


OUTCOMES = st.sampled_from([Outcome.ERROR, Outcome.ERROR, Outcome.TIMEOUT, Outcome.SUCCESS,
                            Outcome.DISCONNECT])


@given(
    n=st.integers(1, 6),
    percent=st.integers(0, 100),
    threshold=st.integers(1, 4),
    steps=st.lists(st.tuples(st.integers(0, 5), OUTCOMES, st.floats(0, 30)), max_size=120),
)
def test_invariants_hold_for_any_sequence(
    n: int, percent: int, threshold: int, steps: list[tuple[int, Outcome, float]]
) -> None:
    d, clock = detector(**{"max-ejection-percent": percent, "consecutive-failures": threshold})
    peers = pool(n)
    for index, outcome, advance in steps:
        clock.now += advance
        instance = peers[index % n]
        before = d.breaker(instance.url).ejections
        ejected = d.record(instance, outcome, peers)
        breaker = d.breaker(instance.url)
        assert breaker.consecutive_failures >= 0 and breaker.ejections >= 0
        assert breaker.ejections == before + ejected
        if ejected:
            assert breaker.ejected_until - clock.now == pytest.approx(min(10.0 * breaker.ejections, 25.0))
        assert sum(d.is_ejected(i.url) for i in peers) <= allowed_ejections(n, percent)
        admitted = d.admit(peers)
        assert admitted  # fail open: never empty
        assert set(admitted) == ({i for i in peers if not d.is_ejected(i.url)} or set(peers))


def test_outlier_and_overload_keys_load_strictly(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("outlier:\n  consecutive-failures: 2\nproxy:\n  max-inflight-per-instance: 8\n")
    config = load_router_config(path, environ={"FDCORE_OUTLIER_BASE_EJECTION_SECS": "7"})
    assert config.outlier.consecutive_failures == 2
    assert config.outlier.base_ejection_secs == 7
    assert config.proxy.max_inflight_per_instance == 8 and config.proxy.retry_after_secs == 1
    path.write_text("outlier:\n  max-ejection-percent: 101\n  bogus: 1\n")
    with pytest.raises(StartupError) as info:
        load_router_config(path, environ={})
    assert f"{path}: outlier.bogus: unknown key" in str(info.value)
    assert f"{path}: outlier.max-ejection-percent:" in str(info.value)

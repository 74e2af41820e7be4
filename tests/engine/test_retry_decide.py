"""What follows a failed delivery attempt: every branch of ``decide``, and its bounds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.engine.retry import Action, Failure, Reason, RetryPolicy, Verdict, decide

POLICY = RetryPolicy(max_attempts=3, initial_backoff_s=1.0, max_backoff_s=5.0, multiplier=2.0)


@pytest.mark.parametrize(
    ("failure", "attempt", "kwargs", "expected"),
    [
        # a channel without queue tries once, whatever the failure
        (Failure.TRANSIENT, 1, {"queued": False}, Verdict(Action.GIVE_UP, Reason.NOT_QUEUED)),
        (Failure.PERMANENT, 1, {"queued": False}, Verdict(Action.GIVE_UP, Reason.NOT_QUEUED)),
        # a permanent refusal is never tried again, even with attempts left
        (Failure.PERMANENT, 1, {}, Verdict(Action.DEAD_LETTER, Reason.PERMANENT)),
        # the policy's last attempt, and past it
        (Failure.TRANSIENT, 3, {}, Verdict(Action.DEAD_LETTER, Reason.ATTEMPTS_SPENT)),
        (Failure.TRANSIENT, 4, {}, Verdict(Action.DEAD_LETTER, Reason.ATTEMPTS_SPENT)),
        # the stream's last delivery: dead rather than dropped, attempts or not
        (Failure.TRANSIENT, 1, {"last_delivery": True}, Verdict(Action.DEAD_LETTER, Reason.LAST_DELIVERY)),
        # backoff: initial × multiplier^(attempt-1)
        (Failure.TRANSIENT, 1, {}, Verdict(Action.RETRY, Reason.TRANSIENT, 1.0)),
        (Failure.TRANSIENT, 2, {}, Verdict(Action.RETRY, Reason.TRANSIENT, 2.0)),
        # scaled by the jitter
        (Failure.TRANSIENT, 2, {"jitter": 1.1}, Verdict(Action.RETRY, Reason.TRANSIENT, 2.2)),
        # the destination's own wait wins over the backoff, without jitter, within the cap
        (Failure.TRANSIENT, 1, {"defer": 0.5, "jitter": 1.1}, Verdict(Action.RETRY, Reason.TRANSIENT, 0.5)),
        (Failure.TRANSIENT, 1, {"defer": 60.0}, Verdict(Action.RETRY, Reason.TRANSIENT, 5.0)),
        (Failure.TRANSIENT, 1, {"defer": -3.0}, Verdict(Action.RETRY, Reason.TRANSIENT, 0.0)),
    ],
)
def test_decide(failure: Failure, attempt: int, kwargs: dict[str, object], expected: Verdict) -> None:
    verdict = decide(failure, attempt, POLICY, **kwargs)  # type: ignore[arg-type]
    assert verdict.action is expected.action and verdict.reason is expected.reason
    assert verdict.delay == pytest.approx(expected.delay)


def test_the_backoff_stops_at_the_cap_jitter_included() -> None:
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=1.0, max_backoff_s=5.0)
    assert decide(Failure.TRANSIENT, 3, policy, jitter=1.1).delay == 4.4
    assert decide(Failure.TRANSIENT, 4, policy, jitter=1.1).delay == 5.0
    assert decide(Failure.TRANSIENT, 4, policy, jitter=0.9).delay == 5.0


def test_a_large_attempt_count_waits_the_cap() -> None:
    policy = RetryPolicy(max_attempts=10**6, max_backoff_s=300.0)
    assert decide(Failure.TRANSIENT, 5000, policy).delay == 300.0


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(0, 50),
    initial_backoff_s=st.floats(0.0, 1e3),
    max_backoff_s=st.floats(0.0, 1e4),
    multiplier=st.floats(1.0, 10.0),
)


@given(
    policy=policies,
    failure=st.sampled_from(Failure),
    attempt=st.integers(1, 10_000),
    last_delivery=st.booleans(),
    defer=st.none() | st.floats(-1e6, 1e6),
    jitter=st.floats(0.9, 1.1),
)
def test_decide_bounds(
    policy: RetryPolicy,
    failure: Failure,
    attempt: int,
    last_delivery: bool,
    defer: float | None,
    jitter: float,
) -> None:
    verdict = decide(failure, attempt, policy, last_delivery=last_delivery, defer=defer, jitter=jitter)
    if verdict.action is Action.RETRY:
        assert 0.0 <= verdict.delay <= policy.max_backoff_s and math.isfinite(verdict.delay)
        assert failure is Failure.TRANSIENT and attempt < policy.max_attempts and not last_delivery
    else:
        assert verdict.delay == 0.0
    if attempt >= policy.max_attempts or last_delivery or failure is Failure.PERMANENT:
        assert verdict.action is Action.DEAD_LETTER
    # never anything but give up for a channel without queue
    unqueued = decide(failure, attempt, policy, queued=False, last_delivery=last_delivery, defer=defer)
    assert unqueued == Verdict(Action.GIVE_UP, Reason.NOT_QUEUED)


@given(policy=policies, attempt=st.integers(1, 10_000))
def test_the_jittered_delay_stays_within_the_cap(policy: RetryPolicy, attempt: int) -> None:
    assert 0.0 <= policy.delay(attempt) <= policy.max_backoff_s


def test_no_initial_backoff_stays_no_wait_for_a_large_attempt_count() -> None:
    policy = RetryPolicy(max_attempts=10**6, initial_backoff_s=0.0)
    assert decide(Failure.TRANSIENT, 5000, policy).delay == 0.0

"""Property tests for waiting clients: the acquire script and memory:// admit a request into
its future slot when the wait fits its deadline, and nothing is ever admitted faster than
the rate (tests/test_properties.py's machinery: a controlled clock, memory:// and the real
Lua on Valkey alike).

Each admission is logged at the moment it runs (the call's time plus the wait it was
given); the exact references then check every window of a quota's length, and every
interval of the bucket, over those run times: waits included, no more than the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

from limiting.core.codec import with_deadline
from limiting.core.layers import compile_plan
from limiting.core.policy import Plan
from tests.test_properties import (
    EPS,
    PREFIX,
    START,
    TWO_WINDOWS,
    Backend,
    Clocked,
    SlidingLog,
    bucket_and_windows,
    machine_settings,
    make_backend,
    with_costs,
)

__all__ = ["make_backend"]   # the fixture, used by name


class WaitingMachine(Clocked):
    """A bucket and two windows; each request asks for a deadline of its own."""

    @initialize(burst=st.integers(1, 4), rate=st.sampled_from([0.5, 1.0, 4.0]),
                quotas=TWO_WINDOWS, start=START)
    def setup(self, burst: int, rate: float, quotas: list[tuple[int, int]], start: int) -> None:
        plan = bucket_and_windows(burst, rate, quotas)
        self.compiled = compile_plan(plan)
        self.keys = [PREFIX + s for s in self.compiled.suffixes]
        self.burst, self.rate = burst, Fraction(rate)
        self.logs = [SlidingLog(n, s * 10**6) for n, s in quotas]
        self.unit_us = min(s for _, s in quotas) * 1e6 / 60
        self.length_us = max(s for _, s in quotas) * 10**6
        self.runs: list[int] = []          # run times of admitted requests (cost 1 each)
        self.b.now_us = start

    @rule(deadline_s=st.sampled_from([0, 0.1, 0.5, 1, 3, 30]), n=st.integers(1, 4))
    def requests(self, deadline_s: float, n: int) -> None:
        """``n`` clients arriving at once, each willing to wait ``deadline_s``."""
        deadline = round(deadline_s * 1e6)
        args = with_deadline(with_costs(self.compiled, {}), deadline)
        for _ in range(n):
            t = self.now
            reply = self.b.acquire(self.keys, args)
            if reply[0] == 1:
                assert 0 <= reply[2] <= deadline
                run = t + reply[2]
                # Arrival order is the order of service.
                assert not self.runs or run >= self.runs[-1] or reply[2] == 0
                self.runs.append(run)
                for log in self.logs:
                    log.add(run, 1)
                self.check(run)
            else:
                assert reply[2] == -1 or reply[2] > deadline, (reply[2], deadline)
                if reply[2] > 0:
                    # Retry-After is honest: a client as patient as the wait passes.
                    patient = with_deadline(with_costs(self.compiled, {}), reply[2])
                    assert self.probe(t, self.keys, patient)[0] == 1

    def check(self, run: int) -> None:
        for log in self.logs:
            # No window of the quota's length, ending at any run, holds more than its limit.
            for end in sorted(t for t, _ in log.entries):
                assert log.used(end) <= log.limit, (log.limit, log.length)
        # The bucket: in any interval of run times, at most burst + rate * its length.
        runs = sorted(self.runs)
        for i, t0 in enumerate(runs):
            for j in range(i, len(runs)):
                units = j - i + 1
                assert units <= self.burst + self.rate * (runs[j] - t0) / 10**6 + EPS, (
                    units, runs[j] - t0)


def test_waiting_clients_never_beat_the_rate(make_backend: Callable[[], Backend]) -> None:
    run_state_machine_as_test(lambda: WaitingMachine(make_backend()),
                              settings=machine_settings(80))


def test_no_deadline_is_todays_call(make_backend: Callable[[], Backend]) -> None:
    """A deadline of 0 sends the same arguments as before: nothing waits."""
    compiled = compile_plan(Plan("p", burst=1, refill_per_second=1.0))
    args = with_costs(compiled, {})
    assert list(with_deadline(args, 0)) == args
    b = make_backend()
    b.now_us = 1_700_000_000_000_000
    keys = [PREFIX + s for s in compiled.suffixes]
    assert b.acquire(keys, args)[0] == 1
    refused = b.acquire(keys, args)
    assert refused[0] == 0 and refused[2] > 0


def test_eight_waiters_are_spaced_by_the_rate(make_backend: Callable[[], Backend]) -> None:
    """burst 1, 4 per second, 3 s deadline: 13 admitted (1 + 3 s x 4), 250 ms apart; the
    rest refused with the wait the queue's end gives."""
    compiled = compile_plan(Plan("p", burst=1, refill_per_second=4.0))
    b = make_backend()
    b.now_us = 1_700_000_000_000_000
    keys = [PREFIX + s for s in compiled.suffixes]
    args = with_deadline(with_costs(compiled, {}), 3_000_000)
    replies = [b.acquire(keys, args) for _ in range(24)]
    admitted = [r[2] for r in replies if r[0] == 1]
    assert len(admitted) == 13
    assert all(abs(w - 250_000 * k) <= 2 * k + 1 for k, w in enumerate(admitted)), admitted
    refused = [r[2] for r in replies if r[0] == 0]
    assert all(3_000_000 < w <= 3_250_000 + 2 * 24 for w in refused), refused


def test_max_wait_seconds_is_checked_with_file_key_and_reason() -> None:
    import pytest

    from limiting.core.policy import PolicyError, parse_policy

    def plans(value: object) -> dict[str, object]:
        return {"plans": {"p": {"burst": 1, "refill_per_second": 1, "max_wait_seconds": value}}}

    assert parse_policy(plans(2.5)).plans["p"].max_wait_seconds == 2.5
    assert parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}}}
                        ).plans["p"].max_wait_seconds == 0
    for bad in (-1, 301, float("nan"), "3", True):
        with pytest.raises(PolicyError, match=r"limits\.toml: plans\.p\.max_wait_seconds"):
            parse_policy(plans(bad), "limits.toml")
    with pytest.raises(PolicyError, match="max_wait_seconds"):   # orgs do not wait alone
        parse_policy({"plans": {"p": {"burst": 1, "refill_per_second": 1}},
                      "orgs": {"o": {"quotas": ["5 per day"], "max_wait_seconds": 1}}},
                     "limits.toml")


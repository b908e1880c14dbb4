"""`python -m bench` publishes only good runs: a failed contender leaves bench/results.md (and
its chart) as the last good run left them and exits non-zero. Checked on the publishing step
itself, with rows made here: no benchmark runs. The floors of one call (bench/floors.py) are
measured briefly against the test Valkey, and leave it as they found it."""

from __future__ import annotations

from pathlib import Path

import redis

from bench import chart, report
from bench.loadgen import WrkResult
from bench.report import Row


def test_a_failed_run_writes_nothing_over_the_last_good_results(tmp_path: Path) -> None:
    results, elsewhere = tmp_path / "results.md", tmp_path / "logs-results.md"
    results.write_text("the last good run\n")
    drawn: list[bool] = []

    status = report.publish("ours: 401\n", ["ours [gevent]"], results, elsewhere,
                            lambda: drawn.append(True))

    assert status == 1
    assert results.read_text() == "the last good run\n"
    assert elsewhere.read_text() == "ours: 401\n"   # the failed report is kept, elsewhere
    assert drawn == []                                 # the chart too stays the good run's


def test_a_good_run_writes_its_results_and_draws_them(tmp_path: Path) -> None:
    results, elsewhere = tmp_path / "results.md", tmp_path / "logs-results.md"
    drawn: list[bool] = []

    assert report.publish("good\n", [], results, elsewhere, lambda: drawn.append(True)) == 0
    assert results.read_text() == "good\n" and drawn == [True] and not elsewhere.exists()


def _wrk(ok_rps: int) -> WrkResult:
    """One measurement of a second with ``ok_rps`` 200s."""
    return WrkResult(rps=ok_rps, requests=ok_rps, duration_s=1.0, p50_ms=1.0, p90_ms=2.0,
                     p99_ms=3.0, statuses={200: ok_rps})


def test_the_chart_draws_the_ratios_of_a_run(tmp_path: Path) -> None:
    none, ours = Row("none", "gevent"), Row("ours", "gevent")
    none.add(_wrk(1000))
    ours.add(_wrk(550))
    failed = Row("flask-limiter", "gevent", failure="no 200 within 30s")

    sections = chart.sections_of([none, ours, failed], [], [])

    assert sections == [("Echo /chat: throughput vs no limiter", "2xx/s / none's",
                         [("ours (gevent)", 0.55)])]
    png = tmp_path / "ratios.png"
    chart.draw(sections, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_floors_of_one_call_are_measured_and_leave_nothing_behind(redis_url: str,
                                                                       r: redis.Redis) -> None:
    from bench.floors import floors

    lines = floors(redis_url, 20)
    assert lines[0].startswith("- The floors of one call") and len(lines) == 7
    assert all(line.endswith("x a PING") and float(line.split(": ")[-1][:-8]) > 0
               for line in lines[1:])
    assert not r.function_list(library="benchfloor")   # the bench's library is deleted
    assert not r.exists("{bench-floor}:user", "{bench-floor}:guard")

"""The log of a connection that keeps failing: its first failure, a reminder now and
then, and its end."""

from __future__ import annotations

import logging

import pytest

from streamer.broker.outage_log import OutageLog


def test_an_outage_is_a_warning_then_a_reminder_a_minute_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = logging.getLogger("outage-test")
    caplog.set_level(logging.DEBUG, logger="outage-test")
    outage = OutageLog(log, remind_every_s=60, clock=lambda: now[0])
    assert outage.ended() == ""
    for _ in range(130):  # an attempt a second
        outage.failed("down")
        now[0] += 1
    said = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [entry for entry in said if entry[0] == "WARNING"] == [
        ("WARNING", "down"),
        ("WARNING", "down (failing for 60s)"),
        ("WARNING", "down (failing for 120s)"),
    ]
    assert len(said) == 130
    assert outage.ended() == " after 130 failed attempts over 130s"
    caplog.clear()
    outage.failed("down again")  # a new outage
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    now[0] += 2.5
    assert outage.ended() == " after 1 failed attempt over 2.5s"


def test_an_unexpected_failure_keeps_its_level_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("outage-test")
    caplog.set_level(logging.DEBUG, logger="outage-test")
    outage = OutageLog(log, clock=lambda: 0.0)
    for _ in range(2):
        try:
            raise RuntimeError("bug")
        except RuntimeError:
            outage.failed("failed", level=logging.ERROR, exc_info=True)
    first, second = caplog.records
    assert (first.levelname, second.levelname) == ("ERROR", "DEBUG")
    assert first.exc_info is not None and first.exc_info[0] is RuntimeError
    assert outage.ended() == " after 2 failed attempts over 0.0s"

"""Log lines as text or as one JSON object each (STREAMER_LOG_FORMAT=json).

`configure(format)` sets up the root logger (what `streamer serve` and gunicorn's
workers log through); in JSON, gunicorn's own loggers (its errors, the access log)
write JSON too. Every stream
that ends logs one line (`streamer.streams`): user, transport, duration, events sent
and the close reason; never a credential.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that do not propagate to the root logger but should look the same.
GUNICORN_LOGGERS = ("gunicorn.error", "gunicorn.access")

streams_log = logging.getLogger("streamer.streams")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields`
    (given as `extra={"fields": {...}}`) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(log_format: str) -> None:
    """INFO and above to stderr, in `log_format` ("text" or "json")."""
    chosen = formatter(log_format)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(chosen)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # In text, gunicorn's own lines stay as gunicorn writes them, and the access log
    # (written by aiohttp through gunicorn's logger, as its bare message) gets a time.
    names = GUNICORN_LOGGERS if log_format == "json" else ("gunicorn.access",)
    for name in names:
        for gunicorn_handler in logging.getLogger(name).handlers:
            gunicorn_handler.setFormatter(chosen)


def stream_ended(
    *, user_id: str, transport: str, duration_s: float, events_sent: int, reason: str
) -> None:
    """The one line per stream end."""
    if not streams_log.isEnabledFor(logging.INFO):
        return
    streams_log.info(
        "stream ended: user=%s transport=%s duration=%.3fs events_sent=%d reason=%s",
        user_id,
        transport,
        duration_s,
        events_sent,
        reason,
        extra={
            "fields": {
                "event": "stream_ended",
                "user": user_id,
                "transport": transport,
                "duration_s": round(duration_s, 3),
                "events_sent": events_sent,
                "reason": reason,
            }
        },
    )

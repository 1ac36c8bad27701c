"""gunicorn's log in STREAMER_LOG_FORMAT from its first line to its last.

    logger_class = "streamer.gunicorn_logger.GunicornLogger"   # deploy/gunicorn.conf.py

gunicorn sets its loggers up before any server hook runs ("Starting gunicorn" is logged
first) and again on every reload (SIGHUP), so a hook that changed their format left
those lines, and every master line after a reload, in gunicorn's own format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from . import logs
from .config import ENV_VARIABLES, ConfigError


class GunicornLogger(Logger):  # type: ignore[misc]
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # gunicorn applies --env (raw_env) to os.environ only after this, and takes it
        # out again before a reload's: read both.
        logs.configure(log_format({**os.environ, **cfg.env}))


def log_format(environ: Mapping[str, str]) -> str:
    """STREAMER_LOG_FORMAT as the service reads it; a bad value is reported (and stops
    start-up) in gunicorn.conf.py's `on_starting`, with every other setting."""
    raw = environ.get("STREAMER_LOG_FORMAT", "").strip()
    if not raw:
        return "text"
    try:
        chosen: str = ENV_VARIABLES["log_format"][0]("STREAMER_LOG_FORMAT", raw)
    except ConfigError:
        return "text"
    return chosen

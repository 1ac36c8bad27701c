"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from .auth.delegated import DelegatedAuth
from .broker.base import Broker
from .config import Config
from .hub import Hub
from .metrics import Metrics
from .rate_limit import BucketsByKey

CONFIG = web.AppKey("config", Config)
HUB = web.AppKey("hub", Hub)
BROKER = web.AppKey("broker", Broker)
METRICS = web.AppKey("metrics", Metrics)
DELEGATED_AUTH = web.AppKey("delegated_auth", DelegatedAuth)  # only with STREAMER_AUTH_URL
# Per-user command rate of the HTTP task API (one bucket per user, in this process).
COMMAND_BUCKETS = web.AppKey("command_buckets", BucketsByKey)
# How fast each user may open streams here (each opening reads their snapshot).
OPENING_BUCKETS = web.AppKey("opening_buckets", BucketsByKey)

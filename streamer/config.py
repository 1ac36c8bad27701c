"""Service configuration: read once from the environment (or CLI flags) and validated."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote_plus, urlsplit

from .client_address import LOOPBACK, Network

# How long streamer.js waits for a long poll's answer by default (its POLL_ANSWER_MS).
STREAMER_JS_POLL_ANSWER_S = 60.0

MIN_SECRET_LENGTH = 32


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Config:
    secret: str
    redis_url: str | None = None
    publish_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    history_size: int = 1000
    history_ttl: int = 3600
    heartbeat_s: float = 15.0
    client_buffer: int = 1000
    client_buffer_bytes: int = 1024 * 1024
    send_timeout_s: float = 30.0
    max_connections: int = 10_000
    max_connections_per_user: int = 20
    ws_max_message_bytes: int = 64 * 1024
    commands_per_s: float = 10.0
    openings_per_s: float = 10.0
    ws_heartbeat_s: float = 30.0
    max_header_bytes: int = 8190
    cookie_secure: bool = True
    sse_retry_ms: int = 3000
    poll_timeout_s: float = 25.0
    demo_mode: bool = False
    max_sessions_per_user: int = 10
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keepalive_s: float = 15.0
    auth_url: str | None = None
    auth_timeout_s: float = 3.0
    auth_cache_s: float = 30.0
    ws_refuse_at_handshake: bool = False
    # What looked wrong in the settings without being an error: for whoever starts the
    # server to log once its logging is set up (`streamer serve`, gunicorn's master).
    warnings: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)
    log_format: str = "text"
    trusted_proxies: tuple[Network, ...] = LOOPBACK

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"STREAMER_SECRET must be at least {MIN_SECRET_LENGTH} characters long "
                f"(got {len(self.secret)}); generate one with "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if self.publish_key is not None and len(self.publish_key) < 16:
            raise ConfigError("STREAMER_PUBLISH_KEY must be at least 16 characters long")
        if self.publish_key is not None and not (
            self.publish_key.isascii() and self.publish_key.isprintable()
        ):
            # Producers send it as a header, which HTTP clients write in ASCII.
            raise ConfigError("STREAMER_PUBLISH_KEY must be printable ASCII")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> Config:
        """Build a config from STREAMER_* variables; `overrides` (CLI flags) win over them.

        Keys of `overrides` are the variable names without the prefix, lower case
        (`redis_url`, `secret`, ...). A None override means "not given".
        """
        values: dict[str, str] = {}
        # Where each value came from, as errors name it: the variable, or the CLI flag.
        sources: dict[str, str] = {}
        for name in ENV_VARIABLES:
            raw = environ.get(f"STREAMER_{name.upper()}")
            if raw is not None and raw.strip() != "":
                values[name], sources[name] = raw.strip(), f"STREAMER_{name.upper()}"
        for name, raw in (overrides or {}).items():
            if name not in ENV_VARIABLES:
                raise ConfigError(f"unknown setting {name!r}")
            if raw is not None:
                values[name], sources[name] = raw.strip(), f"--{name.replace('_', '-')}"

        if "secret" not in values:
            raise ConfigError("STREAMER_SECRET is not set: it signs and verifies the access tokens")
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            parse, _ = ENV_VARIABLES[name]
            kwargs[name] = parse(sources[name], raw)
        warnings = misspelt_variables(environ)
        poll_timeout_s = kwargs.get("poll_timeout_s", cls.poll_timeout_s)
        if poll_timeout_s >= STREAMER_JS_POLL_ANSWER_S:
            warnings.append(
                f"{sources['poll_timeout_s']}={poll_timeout_s:g} holds long polls as long as "
                f"streamer.js waits for an answer ({STREAMER_JS_POLL_ANSWER_S:g} s unless a "
                "page sets pollTimeoutMs): its pages take polls the server still holds for "
                "lost and poll again"
            )
        per_user = kwargs.get("max_connections_per_user", cls.max_connections_per_user)
        per_process = kwargs.get("max_connections", cls.max_connections)
        if per_user > per_process:
            warnings.append(
                f"{sources.get('max_connections_per_user', 'STREAMER_MAX_CONNECTIONS_PER_USER')}"
                f"={per_user} is above {sources.get('max_connections', 'STREAMER_MAX_CONNECTIONS')}"
                f"={per_process}: one user can hold every stream of a process, and no more "
                f"than {per_process}"
            )
        return cls(**kwargs, warnings=tuple(warnings))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _text(name: str, raw: str) -> str:
    if any(ord(ch) < 32 for ch in raw):
        raise ConfigError(f"{name} must not contain control characters")
    return raw


def _parsed(name: str, raw: str, parse: Callable[[str], object], kind: str, form: str) -> str:
    """`raw` if `parse` takes it; else why not, and the URL's form."""
    from .broker.redis_connect import BadRedisUrl

    try:
        parse(raw)
    except BadRedisUrl as exc:
        raise ConfigError(
            f"{name} is not a usable {kind} URL ({exc}); the form is {form}"
        ) from None
    return raw


def _redis_url(name: str, raw: str) -> str:
    if any(ord(ch) < 32 for ch in raw):
        raise ConfigError(f"{name} must not contain control characters")
    if raw.lower().startswith("redis+sentinel://"):
        from .broker.redis_connect import parse_sentinel_url

        return _parsed(
            name, raw, parse_sentinel_url, "Sentinel",
            "redis+sentinel://[:password@]host:port[,host:port...]/<service>[/<db>]",
        )  # fmt: skip
    if raw.lower().startswith("redis+cluster://"):
        from .broker.redis_cluster import parse_cluster_url

        return _parsed(
            name, raw, parse_cluster_url, "Redis Cluster",
            "redis+cluster://[:password@]host:port[,host:port...]",
        )  # fmt: skip
    shown = without_password(raw)
    parts = _split(name, raw, shown)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{name} must be a redis://, rediss://, unix://, redis+sentinel:// or "
            f"redis+cluster:// URL, got {shown!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{name} has no host: {shown!r}")
    if parts.hostname and not re.fullmatch(r"[^\s/?#@]+", parts.hostname):
        raise ConfigError(f"{name} has a bad host: {shown!r}")
    if parts.scheme == "unix" and not parts.path.strip("/"):
        raise ConfigError(f"{name} has no socket path (unix:///path/to/redis.sock): {shown!r}")
    _check_port(name, parts, shown)
    # redis-py would quietly use database 0 for what is not a number, and a number past
    # a 32-bit integer fails only once connected.
    if parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]{1,9}", parts.path):
        raise ConfigError(
            f"{name}: the database after the host must be a number up to 999999999, got {shown!r}"
        )
    if not all(re.fullmatch(r"[0-9]{1,9}", db) for db in parse_qs(parts.query).get("db", [])):
        raise ConfigError(f"{name}: ?db= must be a number up to 999999999, got {shown!r}")
    _check_connection_settings(name, raw, shown)
    return raw


# A URL's numeric connection settings: (name, least value, whether it must be above it).
# A timeout under 10 ms fails reads of a Redis that answers (a replica's, a busy one's).
_NUMERIC_CONNECTION_SETTINGS = (
    ("socket_timeout", 0.01, False),
    ("socket_connect_timeout", 0.01, False),
    ("health_check_interval", 0, False),
    ("max_connections", 1, False),
)


def _check_connection_settings(name: str, raw: str, shown: str) -> None:
    """redis-py hands the URL's query (`?socket_timeout=5`, `?ssl_ca_certs=...`) to each
    connection it makes: an unknown or malformed setting would fail every connection,
    so connections are made here, without connecting them, as the server (asyncio) and
    the publishers (both kinds) make theirs."""
    import redis
    import redis.asyncio

    settings = parse_qs(urlsplit(raw).query)
    if "protocol" in settings:
        # It would override the RESP2 the subscriber reads: no stream would open.
        raise ConfigError(f"{name}: the protocol is streamer's to choose, not ?protocol=")
    # redis-py takes these as numbers without looking at them: a timeout of 0 or less (or
    # of a nanosecond) fails every read, so that the process would run with Redis out of
    # reach for good.
    for setting, least, above in _NUMERIC_CONNECTION_SETTINGS:
        for value in settings.get(setting, []):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and (number > least if above else number >= least)):
                bound = f"above {least:g}" if above else f"{least:g} or more"
                raise ConfigError(f"{name}: ?{setting}= must be a number {bound}, got {shown!r}")
    try:
        for pool in (redis.ConnectionPool, redis.asyncio.ConnectionPool):
            pool.from_url(raw).make_connection()
    except (TypeError, ValueError, redis.RedisError) as exc:
        raise ConfigError(
            f"{name} has a setting redis-py does not take ({exc}): {shown!r}"
        ) from None


def _split(name: str, raw: str, shown: str) -> SplitResult:
    try:
        return urlsplit(raw)
    except ValueError as exc:  # an unbalanced [ or ] around an IPv6 address
        raise ConfigError(f"{name} is not a URL ({exc}): {shown!r}") from None


def _check_port(name: str, parts: SplitResult, shown: str) -> None:
    try:
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"{name} has a bad port: {shown!r}") from exc
    if port == 0:  # no service listens there (redis-py would take it for none, and use 6379)
        raise ConfigError(f"{name} has a bad port: {shown!r}")


def without_password(url: str) -> str:
    """`url` fit for a message: the value of a query setting named like a password
    (redis-py takes `?password=`) is left out, and so is what stands between `//` and
    the last `@`, where a password may hold a / ? or # its writer did not escape (an @
    elsewhere hides the host as well, never a password)."""
    base, mark, query = url.partition("?")
    if mark:
        shown = []
        for item in query.split("&"):
            key, equals, _ = item.partition("=")
            if equals and "password" in unquote_plus(key).lower():
                item = f"{key}=***"
            shown.append(item)
        url = f"{base}?{'&'.join(shown)}"
    scheme, sep, rest = url.partition("//")
    if sep and "@" in rest:
        url = f"{scheme}//***@{rest.rpartition('@')[2]}"
    return url


def _http_url(name: str, raw: str) -> str:
    shown = without_password(raw)
    parts = _split(name, raw, shown)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {shown!r}")
    _check_port(name, parts, shown)
    if any(ord(ch) < 33 for ch in raw):
        raise ConfigError(f"{name} must not contain spaces or control characters")
    return raw


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins: list[str] = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*":
            origins.append(origin)
            continue
        shown = without_password(item.strip())
        parts = _split(name, origin, shown)
        # Only scheme, host and port: a browser's Origin never has more, so an entry
        # with a path, query, fragment or user would never match.
        only_host = origin.lower() == f"{parts.scheme}://{parts.netloc}".lower()
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not only_host
            or "@" in parts.netloc
        ):
            raise ConfigError(
                f"{name} must be a comma-separated list of origins such as "
                f"https://app.example.com (or *), got {shown!r}"
            )
        _check_port(name, parts, shown)
        origins.append(origin.lower())
    return tuple(origins)


def _number(
    convert: Callable[[str], float], kind: str, low: float, high: float
) -> Callable[[str, str], Any]:
    def parse(name: str, raw: str) -> float:
        try:
            # Python's own parsers also take other scripts' digits and "1_000": a
            # value other tools (or a reader) would take for something else.
            if not raw.isascii() or "_" in raw:
                raise ValueError(raw)
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {raw}")
        return value

    return parse


def _networks(name: str, raw: str) -> tuple[Network, ...]:
    if raw.lower() == "none":
        return ()
    networks: list[Network] = []
    for item in raw.split(","):
        entry = item.strip()
        if not entry:
            continue
        if entry == "*":
            networks += (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
            continue
        try:
            if "%" in entry:
                raise ValueError("no zone ids: X-Forwarded-For entries with one are not read")
            # Strict: 10.1.2.3/8 is a typo for an address or for 10.0.0.0/8.
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ConfigError(
                f"{name} must be a comma-separated list of IP addresses or networks "
                f"(10.0.0.0/8), * or none, got {entry!r} ({exc})"
            ) from None
    if not networks:
        raise ConfigError(f"{name} lists no address (none: trust no proxy), got {raw!r}")
    return tuple(networks)


def _log_format(name: str, raw: str) -> str:
    value = raw.lower()
    if value not in ("text", "json"):
        raise ConfigError(f"{name} must be text or json, got {raw!r}")
    return value


def _boolean(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _int_between(low: int, high: int) -> Callable[[str, str], int]:
    return _number(int, "an integer", low, high)


def _seconds(low: float, high: float) -> Callable[[str, str], float]:
    return _number(float, "a number of seconds", low, high)


# name -> (parser, help text); the CLI builds its flags from this table.
ENV_VARIABLES: dict[str, tuple[Callable[[str, str], Any], str]] = {
    "redis_url": (_redis_url, "Redis URL; unset: embedded broker, one process only"),
    "secret": (_text, "key that signs access tokens (HS256), 32+ characters"),
    "publish_key": (_text, "key producers send as X-API-Key to POST /api/tasks/events"),
    "allowed_origins": (_origins, "comma-separated browser origins allowed to connect"),
    "history_size": (_int_between(1, 1_000_000), "events kept per user for resume"),
    "history_ttl": (_int_between(1, 30 * 86400), "seconds a user's history is kept"),
    "heartbeat_s": (_seconds(0.1, 3600), "seconds between SSE heartbeats"),
    "client_buffer": (_int_between(1, 1_000_000), "events buffered per slow client"),
    "client_buffer_bytes": (
        _int_between(64 * 1024, 1024**3),
        "bytes of events buffered per slow client",
    ),
    "send_timeout_s": (
        _seconds(0.1, 3600),
        "seconds a write may wait for a client that stopped reading before it is dropped",
    ),
    "max_connections": (_int_between(1, 1_000_000), "open streams per process"),
    "max_connections_per_user": (_int_between(1, 100_000), "open streams per user and process"),
    "ws_max_message_bytes": (_int_between(256, 16 * 1024 * 1024), "largest client message"),
    "commands_per_s": (
        _number(float, "a number", 0.1, 10_000),
        "commands/s per WebSocket, and per user over HTTP",
    ),
    "openings_per_s": (
        _number(float, "a number", 0.1, 10_000),
        "streams a user may open per second and process, after a burst; more wait, then are"
        " refused",
    ),
    "ws_heartbeat_s": (_seconds(0.1, 3600), "seconds between WebSocket pings; dead peers dropped"),
    "poll_timeout_s": (
        _seconds(0.05, 300),
        "seconds a long poll is held when no event comes (then answered empty)",
    ),
    "max_header_bytes": (_int_between(1024, 1024 * 1024), "longest request line or header"),
    "cookie_secure": (_boolean, "send the session cookie over HTTPS only"),
    "max_sessions_per_user": (_int_between(1, 1000), "live sessions per user (with Redis)"),
    "header_timeout_s": (_seconds(0.1, 3600), "seconds a client has to send a request's headers"),
    "body_timeout_s": (_seconds(0.1, 3600), "seconds a client has to send a request body"),
    "keepalive_s": (_seconds(0.1, 3600), "seconds an idle keep-alive connection stays open"),
    "auth_url": (
        _http_url,
        "URL that checks credentials streamer cannot verify itself (delegated auth)",
    ),
    "auth_timeout_s": (_seconds(0.1, 60), "seconds to wait for the delegated auth service"),
    "auth_cache_s": (_seconds(0, 3600), "seconds a delegated auth answer is kept; 0: not kept"),
    "ws_refuse_at_handshake": (
        _boolean,
        "refuse bad WebSocket credentials with HTTP 403 before the upgrade (not 4401 after)",
    ),
    "log_format": (_log_format, "log lines as text (default) or json, one object per line"),
    "trusted_proxies": (
        _networks,
        "proxies whose X-Forwarded-For the access log believes (addresses, networks, * or none)",
    ),
}


# What else of streamer reads STREAMER_* from the environment: the Celery integration.
OTHER_VARIABLES = frozenset({"STREAMER_CELERY_REVOKE"})
# Kubernetes' service links, for a Service named streamer-redis: STREAMER_REDIS_PORT,
# STREAMER_REDIS_PORT_6379_TCP_ADDR, STREAMER_REDIS_SERVICE_HOST, ...
_SERVICE_LINK = re.compile(
    r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)(_[A-Z]+)?)$"
)


def misspelt_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each STREAMER_* variable that streamer does not read but that
    looks like one it does: a typo (`STREAMER_REDIS_ULR`) is otherwise ignored without a
    word. Other names are left alone, since streamer is not the only one to set them
    (Kubernetes gives every pod STREAMER_SERVICE_HOST and the like for a Service named
    streamer)."""
    known = {f"STREAMER_{name.upper()}" for name in ENV_VARIABLES} | OTHER_VARIABLES
    warnings = []
    for name in sorted(environ):
        if not name.startswith("STREAMER_") or name in known or _SERVICE_LINK.search(name):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if close:
            warnings.append(
                f"{name[:100]} is not a setting of streamer (ignored): did you mean {close[0]}?"
            )
    return warnings


# The warnings this process has logged, or the process it was forked from: a gunicorn
# master logs them at start (deploy/gunicorn.conf.py), and its workers, which read the
# same settings, do not log them again; under a master that did not, each worker does.
_logged_warnings: set[str] = set()


def log_warnings_once(config: Config, log: Callable[[str], object]) -> None:
    """Pass each of `config.warnings` to `log`, but those logged here before."""
    for warning in config.warnings:
        if warning not in _logged_warnings:
            _logged_warnings.add(warning)
            log(warning)

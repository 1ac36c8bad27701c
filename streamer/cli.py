"""The `streamer` command: serve, publish, token, watch."""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from . import logs
from .auth.tokens import DEFAULT_TTL_S, MAX_TIMESTAMP, issue_token
from .broker.base import BrokerUnavailable
from .config import ENV_VARIABLES, Config, ConfigError, log_warnings_once, without_password
from .events import (
    MAX_JSON_DEPTH,
    TERMINAL_STATUSES,
    EventError,
    TaskEvent,
    completed_event,
    progress_event,
    validate_identifier,
    validate_task_id,
)
from .service_url import service_url

log = logging.getLogger("streamer.cli")

DEFAULT_URL = "http://127.0.0.1:8080"


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, (_, help_text) in ENV_VARIABLES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, help=f"{help_text} (STREAMER_{name.upper()})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host", type=_host, default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument(
        "--demo", action="store_true", help="enable the demo login and demo jobs on /"
    )
    _add_setting_flags(serve)

    publish = commands.add_parser("publish", help="publish one task event")
    publish.add_argument("--user", required=True)
    publish.add_argument("--task", required=True)
    publish.add_argument("--progress", type=_ascii_float)
    publish.add_argument("--step", help="current_step text")
    publish.add_argument("--processed", type=_ascii_int)
    publish.add_argument("--total", type=_ascii_int)
    publish.add_argument("--status", help="PROGRESS by default; SUCCESS, FAILURE, REVOKED end it")
    publish.add_argument("--task-name")
    publish.add_argument("--category")
    publish.add_argument("--result", help="result_data, a JSON object")
    publish.add_argument("--error", help="error_message")
    to = publish.add_mutually_exclusive_group()
    to.add_argument("--redis-url", help="publish straight to Redis (STREAMER_REDIS_URL)")
    to.add_argument("--url", help=f"without Redis: the running service ({DEFAULT_URL})")
    publish.add_argument("--publish-key", help="X-API-Key for --url (STREAMER_PUBLISH_KEY)")

    token = commands.add_parser("token", help="print an access token for a user")
    token.add_argument("--user", required=True)
    token.add_argument(
        "--ttl", type=_ascii_int, default=DEFAULT_TTL_S, help="seconds (default 3600)"
    )
    token.add_argument("--secret", help="STREAMER_SECRET")

    watch = commands.add_parser("watch", help="a user's tasks live in the terminal")
    watch.add_argument("--url", default=DEFAULT_URL, help=f"the service ({DEFAULT_URL})")
    who = watch.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="an access token")
    who.add_argument("--user", help="sign a token for this user with STREAMER_SECRET")
    watch.add_argument("--secret", help="STREAMER_SECRET, with --user")
    watch.add_argument(
        "--ttl",
        type=_ascii_int,
        default=DEFAULT_TTL_S,
        help="with --user: seconds each signed token lives; the watch signs a new one "
        "for each connection (default 3600)",
    )
    watch.add_argument("--task-id", help="only this task")
    watch.add_argument("--transport", choices=["auto", "websocket", "sse"], default="auto")
    watch.add_argument("--json", action="store_true", help="print each message as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "publish":
            return _publish(args)
        if args.command == "watch":
            return _watch(args)
        return _token(args)
    except (ConfigError, EventError, ValueError) as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except BrokerUnavailable as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .http_server import serve

    overrides = {name: getattr(args, name) for name in ENV_VARIABLES}
    demo = bool(args.demo)
    # Development mode only when no secret is given at all: an empty --secret or
    # STREAMER_SECRET (a placeholder left in a deployment) is an error.
    if overrides["secret"] is None and os.environ.get("STREAMER_SECRET") is None:
        overrides["secret"] = secrets.token_urlsafe(32)
        demo = True
        print(
            "streamer: no STREAMER_SECRET set: generated one for this run (development "
            "mode: the demo page logs in as user 'demo'). Set STREAMER_SECRET in production.",
            file=sys.stderr,
        )
        if not overrides["publish_key"] and not os.environ.get("STREAMER_PUBLISH_KEY"):
            overrides["publish_key"] = secrets.token_urlsafe(24)
            print(
                f"streamer: generated publish key for this run: {overrides['publish_key']}",
                file=sys.stderr,
            )
    config = Config.from_env(os.environ, overrides)
    if demo:
        # Development over plain http: a Secure cookie would never come back.
        config = config.replace(demo_mode=True, cookie_secure=False)
    logs.configure(config.log_format)
    log_warnings_once(config, functools.partial(log.warning, "%s"))
    broker = without_password(config.redis_url) if config.redis_url else "embedded (in-memory)"

    def listening() -> None:
        log.info("serving on http://%s:%s/ with broker %s", args.host, args.port, broker)

    try:
        asyncio.run(serve(create_app(config), host=args.host, port=args.port, listening=listening))
    except OSError as exc:
        # Binding failed (most often: another server already has the port): one line.
        if exc.errno == errno.EADDRINUSE:
            reason = "the address is already in use (is another server running? try --port)"
        else:
            reason = exc.strerror or str(exc)
        print(
            f"streamer: error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr
        )
        return 1
    return 0


def _ascii_int(text: str) -> int:
    """An integer as the settings take them: ASCII digits (int() also takes other
    scripts' digits and underscores)."""
    return int(_ascii_number(text, "an integer", int))


def _ascii_float(text: str) -> float:
    return float(_ascii_number(text, "a number", float))


def _ascii_number(text: str, kind: str, convert: Callable[[str], float]) -> float:
    try:
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None


def _port(text: str) -> int:
    port = int(text) if text.isascii() and text.isdigit() and len(text) <= 5 else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return port


def _host(text: str) -> str:
    """An address to listen on: an empty one would mean every interface."""
    if not text.strip() or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(f"must be a host name or address, got {text!r}")
    return text


def _signing_secret(given: str | None, missing: str) -> str:
    """The secret as the server reads it (STREAMER_SECRET, or `given`): trimmed and
    checked the same way, so that the tokens it signs are the server's."""
    secret = os.environ.get("STREAMER_SECRET", "") if given is None else given
    if not secret.strip():
        raise ConfigError(missing)
    return Config.from_env({"STREAMER_SECRET": secret}).secret


def _event_from_args(args: argparse.Namespace) -> TaskEvent:
    status = "PROGRESS" if args.status is None else args.status.upper()
    if status in TERMINAL_STATUSES:
        running_only = {
            "--progress": args.progress,
            "--step": args.step,
            "--processed": args.processed,
            "--total": args.total,
            "--task-name": args.task_name,
            "--category": args.category,
        }
        given = [flag for flag, value in running_only.items() if value is not None]
        if given:
            raise EventError(
                f"{', '.join(given)}: not part of a task_completed event; leave "
                f"{'it' if len(given) == 1 else 'them'} out with --status {status}"
            )
        result: Any = None
        if args.result is not None:
            try:
                result = json.loads(args.result)
            except RecursionError:
                raise EventError(
                    f"--result must not nest deeper than {MAX_JSON_DEPTH} levels"
                ) from None
            except ValueError:
                raise EventError("--result must be a JSON object") from None
        return completed_event(
            args.user, args.task, status=status, result_data=result, error_message=args.error
        )
    if args.result is not None or args.error is not None:
        raise EventError("--result and --error need a terminal --status: SUCCESS, FAILURE, REVOKED")
    progress: float | int | None = args.progress
    if isinstance(progress, float) and progress.is_integer():
        progress = int(progress)
    return progress_event(
        args.user,
        args.task,
        progress=progress,
        current_step=args.step,
        processed_items=args.processed,
        total_items=args.total,
        status=status,
        task_name=args.task_name,
        category=args.category,
    )


def _publish(args: argparse.Namespace) -> int:
    event = _event_from_args(args)
    redis_url = _setting(args.redis_url, "STREAMER_REDIS_URL")
    if redis_url and not args.url:
        from .publisher import Publisher

        with Publisher(redis_url) as publisher:
            print(publisher.publish(event))
        return 0
    print(_publish_over_http(event, args))
    return 0


def _setting(flag: str | None, variable: str) -> str | None:
    """The flag's value, else the environment's; trimmed, and blank is none (as the
    service reads its settings)."""
    value = (flag or os.environ.get(variable) or "").strip()
    return value or None


def _publish_over_http(event: TaskEvent, args: argparse.Namespace) -> str:
    url = service_url(DEFAULT_URL if args.url is None else args.url) + "/api/tasks/events"
    key = _setting(args.publish_key, "STREAMER_PUBLISH_KEY")
    if not key:
        raise ConfigError("publishing over HTTP needs --publish-key or STREAMER_PUBLISH_KEY")
    body = json.dumps(
        {"type": event.type, "user_id": event.user_id, "task_id": event.task_id, **event.fields}
    ).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-API-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise BrokerUnavailable(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BrokerUnavailable(f"could not reach {url}: {exc}") from None
    return str(answer["id"])


def _check_ttl(ttl_s: int) -> None:
    if ttl_s <= 0 or time.time() + ttl_s > MAX_TIMESTAMP:
        raise ConfigError("--ttl must be a positive number of seconds ending before 10000 AD")


def _token(args: argparse.Namespace) -> int:
    secret = _signing_secret(args.secret, "STREAMER_SECRET is not set (or pass --secret)")
    _check_ttl(args.ttl)
    print(issue_token(secret, validate_identifier("--user", args.user), ttl_s=args.ttl))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from .watch import Watch, watch

    sign = None
    token = args.token
    if token is None:
        secret = _signing_secret(
            args.secret, "--user signs a token with STREAMER_SECRET: set it (or --secret)"
        )
        user_id = validate_identifier("--user", args.user)
        _check_ttl(args.ttl)
        sign = functools.partial(issue_token, secret, user_id, ttl_s=args.ttl)
        token = sign()
    task_id = None if args.task_id is None else validate_task_id(args.task_id, "--task-id")
    stream = Watch(args.url, token, transport=args.transport, task_id=task_id, sign=sign)
    try:
        return asyncio.run(watch(stream, as_json=args.json))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

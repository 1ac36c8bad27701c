"""Shared fixtures: a private redis-server, app clients, and real server processes."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import hypothesis
import pytest
import redis
from aiohttp.test_utils import TestClient

from streamer.app import create_app
from streamer.auth.tokens import issue_token
from streamer.config import Config
from streamer.publisher import Publisher

from .browser import Browser, find_chromium
from .processes import (
    RedisServer,
    ServerProcess,
    free_port,
    gunicorn_args,
    start_server_process,
)

# Fuzzing explores the same examples on every run: a failure is reproducible, and a
# green run cannot turn red by chance.
hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis.settings.load_profile("deterministic")

SECRET = "test-secret-" + "x" * 60
PUBLISH_KEY = "test-publish-key-0123456789"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port, for the whole test session."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: .ci/run installs it (apt redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.ensure_running()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def secret() -> str:
    return SECRET


@pytest.fixture
def token_for() -> Callable[..., str]:
    def make(user_id: str, ttl_s: int = 3600) -> str:
        return issue_token(SECRET, user_id, ttl_s=ttl_s)

    return make


@pytest.fixture
def user_id() -> str:
    return f"user-{secrets.token_hex(4)}"


@pytest.fixture(params=["memory", "redis"])
def config(request: pytest.FixtureRequest) -> Config:
    """The service config, once with the embedded broker and once with Redis."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Config(
        secret=SECRET,
        publish_key=PUBLISH_KEY,
        redis_url=redis_url,
        history_size=100,
        heartbeat_s=0.5,
        client_buffer=50,
        max_connections_per_user=500,  # tests open hundreds of streams for one user
    )


@pytest.fixture
async def client(
    config: Config, aiohttp_client: Callable[..., object]
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = await create_app(config)
    test_client = await aiohttp_client(app)  # type: ignore[misc]
    yield test_client


@pytest.fixture
async def redis_client(redis_url: str, aiohttp_client: Callable[..., object]) -> TestClient:  # type: ignore[type-arg]
    """The app on the private Redis only (for what only Redis does: faults, data loss)."""
    config = Config(secret=SECRET, publish_key=PUBLISH_KEY, redis_url=redis_url, heartbeat_s=0.5)
    test_client: TestClient = await aiohttp_client(await create_app(config))  # type: ignore[misc]
    return test_client


@pytest.fixture
def process_env(tmp_path: Path) -> dict[str, str]:
    """Environment for server subprocesses: this interpreter's scripts first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}
    env["STREAMER_SECRET"] = SECRET
    env["STREAMER_PUBLISH_KEY"] = PUBLISH_KEY
    # Tests open many streams for one user; the limit itself is tested separately.
    env["STREAMER_MAX_CONNECTIONS_PER_USER"] = "1000"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server subprocess; every one started is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        args: list[str], env: dict[str, str], port: int | None = None, cwd: Path | None = None
    ) -> ServerProcess:
        process = start_server_process(args, env, port or free_port(), tmp_path, cwd)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


StartGunicorn = Callable[[int], tuple[ServerProcess, dict[str, str]]]


@pytest.fixture
def start_gunicorn(
    redis_url: str, process_env: dict[str, str], start_process: Callable[..., ServerProcess]
) -> StartGunicorn:
    """Start gunicorn with N aiohttp workers on the private Redis, once every worker has
    started (one serving is not all of them); returns it and the environment its
    producers should use."""
    env = {**process_env, "STREAMER_REDIS_URL": redis_url}

    def start(workers: int) -> tuple[ServerProcess, dict[str, str]]:
        server = start_process(gunicorn_args(workers), env)
        server.wait_healthy()
        server.wait_workers_started(workers)
        return server, env

    return start


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail(
            "Chromium is not installed: the browser tests need it "
            "(`apt-get install -y chromium`; .ci/run installs it)",
            pytrace=False,
        )
    return path


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """Headless Chromium with one page, gone after the test."""
    async with Browser(chromium) as browser:
        yield browser


@pytest.fixture
def publisher(redis_url: str) -> Iterator[Publisher]:
    """A producer on the private Redis."""
    with Publisher(redis_url) as publisher:
        yield publisher

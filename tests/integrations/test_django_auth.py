"""Delegated authentication against a real Django app (REST framework tokens, sessions),
run under gunicorn, in front of the real service (gunicorn, Redis)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamer.auth.tokens import verify_token
from streamer.publisher import AsyncPublisher

from ..clients import SseReader, ws_close_code, ws_json
from ..conftest import SECRET
from ..processes import ServerProcess, gunicorn_args
from ..waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[2]
AUTH_PATH = "/streamer/auth/"
Users = dict[str, dict[str, str]]


@dataclass
class DjangoSite:
    server: ServerProcess
    access_log: Path
    users: Users

    @property
    def auth_url(self) -> str:
        return self.server.base_url + AUTH_PATH

    def auth_requests(self) -> int:
        """POSTs the auth view has answered, from the app server's own access log."""
        if not self.access_log.exists():
            return 0
        return sum(f"POST {AUTH_PATH}" in line for line in self.access_log.read_text().splitlines())


def _django_env(process_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **process_env,
        "DJANGO_SETTINGS_MODULE": "tests.integrations.django_site.settings",
        "DJANGO_SECRET_KEY": "django-test-key-" + "z" * 40,
        "DJANGO_DB_PATH": str(tmp_path / "django.sqlite3"),
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="module")
def django_database(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Users]:
    """The app's database, migrated and with its users, made once and copied per test."""
    directory = tmp_path_factory.mktemp("django")
    env = _django_env({**os.environ, "STREAMER_SECRET": SECRET}, directory)
    run = {"env": env, "cwd": ROOT, "check": True, "capture_output": True, "timeout": 120}
    subprocess.run([sys.executable, "-m", "django", "migrate", "--noinput"], **run)  # type: ignore[call-overload]
    made = subprocess.run(  # type: ignore[call-overload]
        [sys.executable, "-m", "tests.integrations.django_site.make_users"], **run
    )
    return directory / "django.sqlite3", json.loads(made.stdout)


@pytest.fixture
def django_site(
    tmp_path: Path,
    process_env: dict[str, str],
    start_process: Callable[..., ServerProcess],
    django_database: tuple[Path, Users],
) -> DjangoSite:
    database, users = django_database
    env = _django_env(process_env, tmp_path)
    shutil.copyfile(database, env["DJANGO_DB_PATH"])
    access_log = tmp_path / "django-access.log"
    command = [
        "gunicorn", "tests.integrations.django_site.wsgi:application",
        "--bind", "127.0.0.1:{port}", "--workers", "2",
        "--access-logfile", str(access_log), "--chdir", str(ROOT),
    ]  # fmt: skip
    server = start_process(command, env)
    # The auth view answers GET with 405: the app is up.
    eventually_sync(lambda: _status(server, AUTH_PATH) == 405, what="django", timeout=30)
    return DjangoSite(server, access_log, users)


def _status(server: ServerProcess, path: str) -> int | None:
    if server.process.poll() is not None:
        raise RuntimeError(f"django exited:\n{server.log()}")
    try:
        return server.get(path)[0]
    except OSError:
        return None


StartStreamer = Callable[..., ServerProcess]


@pytest.fixture
def start_streamer(
    redis_url: str, process_env: dict[str, str], start_process: Callable[..., ServerProcess]
) -> StartStreamer:
    def start(auth_url: str, **settings: str) -> ServerProcess:
        env = {
            **process_env,
            "STREAMER_REDIS_URL": redis_url,
            "STREAMER_AUTH_URL": auth_url,
            **{f"STREAMER_{name.upper()}": value for name, value in settings.items()},
        }
        server = start_process(gunicorn_args(1), env)
        server.wait_healthy()
        return server

    return start


@pytest.fixture
def streamer(django_site: DjangoSite, start_streamer: StartStreamer) -> ServerProcess:
    return start_streamer(django_site.auth_url)


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def publisher(redis_url: str) -> Any:
    async with AsyncPublisher(redis_url) as producer:
        yield producer


def _ws_url(server: ServerProcess, query: str = "") -> str:
    return server.base_url.replace("http", "ws", 1) + "/ws/tasks/" + query


async def test_rest_framework_tokens_open_both_transports_as_their_user(
    django_site: DjangoSite,
    streamer: ServerProcess,
    http: aiohttp.ClientSession,
    publisher: AsyncPublisher,
) -> None:
    alice, bob = django_site.users["alice"], django_site.users["bob"]
    async with (
        http.ws_connect(_ws_url(streamer, f"?token={alice['token']}")) as alice_ws,
        http.get(
            streamer.base_url + "/sse/tasks/",
            headers={"Authorization": f"Token {bob['token']}"},
        ) as bob_sse,
    ):
        assert (await ws_json(alice_ws))["type"] == "active_tasks"
        assert bob_sse.status == 200
        bob_reader = SseReader(bob_sse)
        assert (await bob_reader.next()).event == "active_tasks"
        await publisher.progress(alice["id"], "alice-report", progress=10)
        await publisher.progress(bob["id"], "bob-report", progress=20)
        assert (await ws_json(alice_ws))["task_id"] == "alice-report"
        # Each stream is its user's: bob's first task event is his own.
        assert (await bob_reader.next()).json["task_id"] == "bob-report"


async def test_a_django_session_cookie_opens_both_transports(
    django_site: DjangoSite,
    streamer: ServerProcess,
    http: aiohttp.ClientSession,
    publisher: AsyncPublisher,
) -> None:
    alice = django_site.users["alice"]
    cookie = {"Cookie": f"csrftoken=abc; sessionid={alice['sessionid']}"}
    async with (
        http.ws_connect(_ws_url(streamer), headers=cookie) as ws,
        http.get(streamer.base_url + "/sse/tasks/", headers=cookie) as sse,
    ):
        assert (await ws_json(ws))["type"] == "active_tasks"
        assert sse.status == 200
        reader = SseReader(sse)
        assert (await reader.next()).event == "active_tasks"
        await publisher.progress(alice["id"], "from-cookie", progress=5)
        assert (await ws_json(ws))["task_id"] == "from-cookie"
        assert (await reader.next()).json["task_id"] == "from-cookie"


async def test_a_cookie_stream_from_a_foreign_page_is_refused(
    django_site: DjangoSite, streamer: ServerProcess, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Cookie": f"sessionid={django_site.users['alice']['sessionid']}",
        "Origin": "https://evil.example",
    }
    async with http.get(streamer.base_url + "/sse/tasks/", headers=headers) as sse:
        assert sse.status == 403


@pytest.mark.parametrize("credential", ["wrong-token", "deactivated-token", "wrong-cookie"])
async def test_credentials_the_app_refuses_are_refused_on_both_transports(
    django_site: DjangoSite, streamer: ServerProcess, http: aiohttp.ClientSession, credential: str
) -> None:
    mallory = django_site.users["mallory"]
    query, headers = {
        "wrong-token": ("?token=not-a-real-token", {}),
        "deactivated-token": (f"?token={mallory['token']}", {}),
        "wrong-cookie": ("", {"Cookie": "sessionid=no-such-session"}),
    }[credential]
    async with http.ws_connect(_ws_url(streamer, query), headers=headers) as ws:
        assert await ws_close_code(ws) == 4401
    async with http.get(streamer.base_url + "/sse/tasks/" + query, headers=headers) as sse:
        assert sse.status == 401
    # The deactivated user's session is refused too.
    session = {"Cookie": f"sessionid={mallory['sessionid']}"}
    async with http.get(streamer.base_url + "/sse/tasks/", headers=session) as sse:
        assert sse.status == 401


async def test_streamer_tokens_still_work_and_are_not_sent_to_the_app(
    django_site: DjangoSite,
    streamer: ServerProcess,
    http: aiohttp.ClientSession,
    token_for: Callable[..., str],
) -> None:
    async with http.ws_connect(_ws_url(streamer, f"?token={token_for('u-jwt')}")) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"
    assert django_site.auth_requests() == 0


async def test_the_auth_service_down_is_unavailable_never_admitted(
    django_site: DjangoSite, streamer: ServerProcess, http: aiohttp.ClientSession
) -> None:
    django_site.server.stop()
    token = django_site.users["bob"]["token"]
    async with http.ws_connect(_ws_url(streamer, f"?token={token}")) as ws:
        assert await ws_close_code(ws) == 1013
    async with http.get(streamer.base_url + f"/sse/tasks/?token={token}") as sse:
        assert sse.status == 503
        assert sse.headers["Retry-After"] == "1"
    _, metrics = streamer.get("/metrics")
    assert 'streamer_refusals_total{reason="auth_unavailable"} 2.0' in metrics.decode()


async def test_answers_are_cached_so_a_reconnect_storm_asks_once(
    django_site: DjangoSite, streamer: ServerProcess, http: aiohttp.ClientSession
) -> None:
    token = django_site.users["alice"]["token"]

    async def connect() -> None:
        async with http.ws_connect(_ws_url(streamer, f"?token={token}")) as ws:
            assert (await ws_json(ws))["type"] == "active_tasks"

    # A storm: 25 at once (they share one check), then 25 one after another.
    await asyncio.gather(*(connect() for _ in range(25)))
    for _ in range(25):
        await connect()
    eventually_sync(lambda: django_site.auth_requests() >= 1, what="access log", timeout=10)
    assert django_site.auth_requests() == 1


async def test_with_no_cache_every_connection_asks(
    django_site: DjangoSite, start_streamer: StartStreamer, http: aiohttp.ClientSession
) -> None:
    streamer = start_streamer(django_site.auth_url, auth_cache_s="0")
    token = django_site.users["alice"]["token"]
    for _ in range(3):
        async with http.ws_connect(_ws_url(streamer, f"?token={token}")) as ws:
            assert (await ws_json(ws))["type"] == "active_tasks"
    eventually_sync(lambda: django_site.auth_requests() == 3, what="3 auth requests", timeout=10)


async def test_refusal_at_the_handshake_is_a_403_before_the_upgrade(
    django_site: DjangoSite, start_streamer: StartStreamer, http: aiohttp.ClientSession
) -> None:
    streamer = start_streamer(django_site.auth_url, ws_refuse_at_handshake="true")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(_ws_url(streamer, "?token=not-a-real-token"))
    assert refused.value.status == 403
    token = django_site.users["alice"]["token"]
    async with http.ws_connect(_ws_url(streamer, f"?token={token}")) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"


def test_the_token_view_mints_streamer_tokens_for_logged_in_users(
    django_site: DjangoSite, streamer: ServerProcess
) -> None:
    alice = django_site.users["alice"]
    request = urllib.request.Request(
        django_site.server.base_url + "/streamer/token/",
        headers={"Cookie": f"sessionid={alice['sessionid']}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        token = json.load(response)["token"]
    assert verify_token(SECRET, token).user_id == alice["id"]


def test_the_token_view_answers_401_to_a_visitor_not_logged_in(django_site: DjangoSite) -> None:
    """JSON a page's fetch can read, not a redirect to the login page (whose HTML it
    would have taken for a token), also on a site that requires a login everywhere."""
    status, body = django_site.server.get("/streamer/token/")
    assert status == 401
    assert json.loads(body) == {"error": "unauthorized"}


def test_the_token_view_refuses_an_inactive_user(django_site: DjangoSite) -> None:
    """A deactivated account whose session still authenticates (this site's backend
    lets it) got a working streamer token, where the auth view refused its session."""
    mallory = django_site.users["mallory"]
    request = urllib.request.Request(
        django_site.server.base_url + "/streamer/token/",
        headers={"Cookie": f"sessionid={mallory['sessionid']}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401


def test_no_token_is_minted_for_a_visitor_not_logged_in(
    process_env: dict[str, str], tmp_path: Path
) -> None:
    """`streamer_token(request.user)` for an anonymous visitor gave a valid token for the
    user "None", one identity shared by every visitor."""
    script = (
        "import django; django.setup()\n"
        "from django.contrib.auth.models import AnonymousUser\n"
        "from streamer.integrations.django import streamer_token\n"
        "streamer_token(AnonymousUser())\n"
    )
    env = {**_django_env(process_env, tmp_path), "STREAMER_SECRET": SECRET}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert run.returncode != 0
    assert b"ValueError: streamer tokens are for logged-in, active users" in run.stderr


def test_the_auth_view_answers_400_to_json_nested_past_pythons_limit(
    django_site: DjangoSite,
) -> None:
    request = urllib.request.Request(django_site.auth_url, data=b"[" * 100_000, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 400


def test_a_session_stream_expires_with_the_session(django_site: DjangoSite, tmp_path: Path) -> None:
    """The answer's `expires_in` is what the stored session has left, not a fresh
    SESSION_COOKIE_AGE: a stream on a session must not outlive it."""
    alice = django_site.users["alice"]
    soon = datetime.now(UTC) + timedelta(seconds=30)
    with sqlite3.connect(tmp_path / "django.sqlite3") as database:
        changed = database.execute(
            "UPDATE django_session SET expire_date = ? WHERE session_key = ?",
            (soon.strftime("%Y-%m-%d %H:%M:%S.%f"), alice["sessionid"]),
        ).rowcount
    assert changed == 1

    def expires_in(cookie: str) -> int:
        request = urllib.request.Request(
            django_site.auth_url,
            data=json.dumps({"token": None, "cookie": cookie}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: int = json.load(response)["expires_in"]
            return answer

    assert 1 <= expires_in(f"sessionid={alice['sessionid']}") <= 30
    bob = django_site.users["bob"]
    two_weeks = 14 * 24 * 3600  # Django's SESSION_COOKIE_AGE, as it was stored at login
    assert two_weeks - 86400 <= expires_in(f"sessionid={bob['sessionid']}") <= two_weeks


def test_a_user_whose_id_field_is_empty_cannot_stream(
    process_env: dict[str, str], tmp_path: Path, django_database: tuple[Path, Users]
) -> None:
    """STREAMER_USER_ID_FIELD = "email", Django's default blank email: the auth view
    answered 200 with user id "" (streamer took that for an outage: every stream got
    1013 / 503 for ever); a None field gave every such user the id "None"; one over
    200 characters got a token from the token view that streamer refused."""
    database, _ = django_database
    env = {**_django_env(process_env, tmp_path), "STREAMER_SECRET": SECRET}
    shutil.copyfile(database, env["DJANGO_DB_PATH"])
    script = (
        "import json, django; django.setup()\n"
        "from django.contrib.auth.models import User\n"
        "from django.test import Client, override_settings\n"
        "from rest_framework.authtoken.models import Token\n"
        "from streamer.integrations.django import streamer_token\n"
        "alice = User.objects.get(username='alice')\n"
        "key = Token.objects.get(user=alice).key\n"
        "logged_in = Client()\n"
        "logged_in.force_login(alice)\n"
        "said = {}\n"
        "with override_settings(STREAMER_USER_ID_FIELD='email'):\n"
        "    auth = Client().post('/streamer/auth/', {'token': key},\n"
        "                         content_type='application/json')\n"
        "    said['auth'] = [auth.status_code, auth.json()]\n"
        "    mint = logged_in.get('/streamer/token/')\n"
        "    said['mint'] = [mint.status_code, mint.json()]\n"
        "alice.email = 'x' * 201\n"
        "alice.save()\n"
        "with override_settings(STREAMER_USER_ID_FIELD='email'):\n"
        "    mint = logged_in.get('/streamer/token/')\n"
        "    said['long'] = [mint.status_code, mint.json()]\n"
        "alice.last_login = None\n"
        "with override_settings(STREAMER_USER_ID_FIELD='last_login'):\n"
        "    try:\n"
        "        streamer_token(alice)\n"
        "    except ValueError as exc:\n"
        "        said['token'] = str(exc)\n"
        "print(json.dumps(said))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert run.returncode == 0, run.stderr.decode()
    said = json.loads(run.stdout)
    no_email = "this user cannot stream: their email ('') is no user id"
    assert said["auth"] == [403, {"error": no_email}]
    assert said["mint"] == [403, {"error": no_email}]
    assert said["token"] == "this user cannot stream: their last_login (None) is no user id"
    # A token streamer would refuse ("bad subject") is not minted either.
    assert said["long"] == [403, {"error": "user ids longer than 200 characters cannot stream"}]

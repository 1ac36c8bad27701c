"""What a new user copies from the README and meets first: the Celery and Publisher
snippets run as shown, the soak table is what the soak prints, a second `streamer serve`
on a used port says so in one line, and messages name `python3`."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from bench.soak import FAULT_COUNTS, evaluate
from streamer.broker.redis_schema import CANCEL_SCRIPT, cancel_call, task_key
from streamer.config import Config, ConfigError
from streamer.publisher import Publisher

from .processes import BIN, ServerProcess
from .test_soak import DURATION_S, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TokenFor = Callable[..., str]
StartProcess = Callable[..., ServerProcess]


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    following = re.search(r"\n##+ ", README[start + len(title) + 2 :])
    end = start + len(title) + 2 + following.start() if following else len(README)
    return README[start:end]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", text, re.S)


async def test_the_celery_snippet_runs_as_shown(
    redis_client: TestClient,  # type: ignore[type-arg]
    redis_url: str,
    token_for: TokenFor,
) -> None:
    (snippet,) = code_blocks(section("### Celery"), "python")
    # The addresses of this test's Redis instead of localhost's.
    source = snippet.replace("redis://localhost:6379/0", redis_url).replace(
        "redis://localhost:6379/1", redis_url
    )
    assert source.count(redis_url) == 3
    module = ast.parse(source)
    *setup, start = module.body
    assert isinstance(start, ast.Expr), "the snippet ends by starting the job"
    namespace: dict[str, Any] = {"__name__": "jobs"}
    exec(compile(ast.Module(setup, []), "README.md", "exec"), namespace)
    namespace["app"].conf.task_always_eager = True  # the worker's part, here
    result = eval(compile(ast.Expression(start.value), "README.md", "eval"), namespace)
    assert result.get(timeout=30) == {"images": 12}

    user_id = re.search(r'user_id="(\w+)"', snippet)
    assert user_id is not None
    token = token_for(user_id.group(1))
    answer = await redis_client.get(
        f"/api/tasks/{result.id}", headers={"Authorization": f"Bearer {token}"}
    )
    state = (await answer.json())["status"]
    assert state["status"] == "SUCCESS" and state["result_data"] == {"images": 12}
    assert (state["progress"], state["processed_items"], state["total_items"]) == (100, 12, 12)
    assert state["task_name"] == "jobs.resize_images"

    # The task is the one the Celery integration tests run, but for the work itself.
    tested = (ROOT / "tests" / "integrations" / "celery_app.py").read_text()
    body = snippet[snippet.index("        self.update_progress(") : snippet.index("\n\n\n# Where")]
    assert body in tested


def soak_block() -> tuple[str, str, list[tuple[str, str]]]:
    """The soak command the README shows, and what it printed: the heading line and
    the figures (measure, value)."""
    text = README[README.index("Soak under faults") :]
    (command,) = code_blocks(text[: text.index("```text")], "sh")[:1]
    heading, *lines = code_blocks(text, "text")[0].splitlines()
    figures = [(line.split()[0], line.split()[1]) for line in lines]
    return command, heading, figures


def test_the_soak_figures_are_what_the_soak_prints() -> None:
    command, heading, figures = soak_block()
    args = command.replace("\\\n", " ").split()
    assert args[:3] == [".venv/bin/python", "-m", "bench.soak"]
    # The harsh setting CI runs (tests/test_soak.py).
    assert args[3:] == ["--duration", f"{DURATION_S:g}", *SETTINGS["harsh"]]
    flags = dict(zip(args[3::2], args[4::2], strict=True))
    assert heading == (
        f"soak {float(flags['--duration']):g}s, {flags['--clients']} clients, "
        f"{flags['--workers']} workers:"
    )
    printed_keys = [*evaluate([], {}), *FAULT_COUNTS]
    assert [key for key, _ in figures] == printed_keys
    values = dict(figures)
    assert all(value.isdigit() for value in values.values())
    for key in ("lost", "duplicated", "reordered", "unexpected", "backward_ids"):
        assert values[key] == "0"
    assert values["delivered"] == values["expected_deliveries"]


def test_a_second_server_on_a_used_port_says_so_in_one_line(
    process_env: dict[str, str], start_process: StartProcess
) -> None:
    first = start_process(["streamer", "serve", "--port", "{port}"], process_env)
    first.wait_healthy()
    second = subprocess.run(
        [str(BIN / "streamer"), "serve", "--port", str(first.port)],
        env=process_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode != 0
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last == (
        f"streamer: error: cannot listen on 127.0.0.1:{first.port}: the address is already "
        "in use (is another server running? try --port)"
    )
    assert first.get("/healthz")[0] == 200  # the first one is untouched


def test_messages_and_docs_name_python3() -> None:
    with pytest.raises(ConfigError, match=r"`python3 -c 'import secrets"):
        Config(secret="short")
    bare = re.compile(r"(?<![\w/.-])python (-c|-m) ")
    texts = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts += sorted((ROOT / "streamer").rglob("*.py"))
    for path in texts:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not bare.search(line), f"{path.relative_to(ROOT)}:{number}: {line}"


def test_security_policy_says_how_to_report_a_vulnerability() -> None:
    policy = (ROOT / "SECURITY.md").read_text()
    assert "\n## Reporting a vulnerability\n" in policy


def test_the_publisher_snippet_runs_as_shown(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = code_blocks(section("## Producers"), "python")[0]
    monkeypatch.setenv("STREAMER_REDIS_URL", redis_url)
    saved: list[list[int]] = []
    namespace: dict[str, Any] = {"save": saved.append}
    exec(compile(snippet, "README.md", "exec"), namespace)
    batches = [[1, 2], [3], [4, 5, 6]]
    namespace["import_rows"]("readme-user", "readme-import", batches)
    assert saved == batches
    with Publisher(redis_url) as publisher:
        publisher.progress("readme-user", "readme-cancelled", progress=1)
    with redis.Redis.from_url(redis_url) as admin:
        cancel = cancel_call("readme-user", "readme-cancelled")
        assert admin.eval(CANCEL_SCRIPT, len(cancel.keys), *cancel.keys, *cancel.args) == 1
        namespace["import_rows"]("readme-user", "readme-cancelled", batches)
        assert saved == batches  # a cancelled job saves nothing more
        done = json.loads(admin.hget(task_key("readme-user", "readme-import"), "result_data"))
        status = admin.hget(task_key("readme-user", "readme-cancelled"), "status")
    assert done == {"rows": 6}
    assert json.loads(status) == "REVOKED"

"""GET /: the demo page; /static/: the browser client library."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web

from ..app_keys import BROKER, CONFIG
from ..auth.tokens import issue_token
from ..broker.base import Broker
from ..events import completed_event, progress_event

DEMO_USER = "demo"


async def index(request: web.Request) -> web.Response:
    page = resources.files("streamer").joinpath("static/index.html").read_text()
    return web.Response(text=page, content_type="text/html")


async def demo_token(request: web.Request) -> web.Response:
    """Only with `streamer serve` in development mode: a token for the demo user."""
    config = request.app[CONFIG]
    if not config.demo_mode:
        raise web.HTTPNotFound()
    token = issue_token(config.secret, DEMO_USER, ttl_s=3600)
    return web.json_response({"user_id": DEMO_USER, "token": token})


DemoJobs = set[asyncio.Task[None]]
DEMO_JOBS = web.AppKey("demo_jobs", DemoJobs)
DEMO_STEPS = 10
DEMO_STEP_S = 0.4


async def start_demo_job(request: web.Request) -> web.Response:
    """Only in development mode: run a fake background job for the demo user."""
    if not request.app[CONFIG].demo_mode:
        raise web.HTTPNotFound()
    task_id = f"demo-{secrets.token_hex(4)}"
    job = asyncio.create_task(_run_demo_job(request.app[BROKER], task_id))
    jobs = request.app[DEMO_JOBS]
    jobs.add(job)
    job.add_done_callback(jobs.discard)
    return web.json_response({"task_id": task_id}, status=202)


async def _run_demo_job(broker: Broker, task_id: str) -> None:
    for step in range(DEMO_STEPS):
        if await broker.is_cancelled(DEMO_USER, task_id):
            await broker.publish(completed_event(DEMO_USER, task_id, status="REVOKED"))
            return
        await broker.publish(
            progress_event(
                DEMO_USER,
                task_id,
                progress=step * 100 // DEMO_STEPS,
                current_step=f"step {step + 1} of {DEMO_STEPS}",
                processed_items=step,
                total_items=DEMO_STEPS,
                task_name="demo job",
                category="demo",
                status="STARTED" if step == 0 else "PROGRESS",
            )
        )
        await asyncio.sleep(DEMO_STEP_S)
    await broker.publish(completed_event(DEMO_USER, task_id, result_data={"items": DEMO_STEPS}))


async def demo_jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    jobs: DemoJobs = set()
    app[DEMO_JOBS] = jobs
    yield
    for job in tuple(jobs):
        job.cancel()

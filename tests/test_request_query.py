"""Stream parameters are read from the raw query, decoded as aiohttp decodes
`request.query`, without leaving the parsed query in the request for the stream's life."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from streamer.request_query import query_value

TARGETS = [
    "/sse/tasks/",
    "/sse/tasks/?",
    "/sse/tasks/?token=abc.def-ghi_j",
    "/sse/tasks/?token=a%2Bb%20c+d&heartbeat=event",
    "/sse/tasks/?token=&token=second",
    "/sse/tasks/?task_id=%E2%82%AC%20job&last_event_id=ab-1-0",
    "/sse/tasks/?tokens=x&token_=y&xtoken=z",
    "/sse/tasks/?heartbeat&task_id==x",
    "/sse/tasks/?task_id=a%ZZb&last_event_id=%",
    "/ws/tasks/?last_event_id=a&last_event_id=b",
    "/ws/tasks/?%74oken=escaped&heart%62eat=event",
]
NAMES = ["token", "heartbeat", "task_id", "last_event_id"]


@pytest.mark.parametrize("target", TARGETS)
def test_values_are_those_of_request_query(target: str) -> None:
    request = make_mocked_request("GET", target)
    read = {name: query_value(request, name) for name in NAMES}
    assert read == {name: request.query.get(name) for name in NAMES}

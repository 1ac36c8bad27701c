"""Stream parameters are read from the raw query, decoded as aiohttp decodes
`request.query`, without leaving the parsed query in the request for the stream's life;
one given twice, or whose escapes are not UTF-8, is refused."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from streamer.request_query import QueryError, query_value

TARGETS = [
    "/sse/tasks/",
    "/sse/tasks/?",
    "/sse/tasks/?token=abc.def-ghi_j",
    "/sse/tasks/?token=a%2Bb%20c+d&heartbeat=event",
    "/sse/tasks/?token=&heartbeat=",
    "/sse/tasks/?task_id=%E2%82%AC%20job&last_event_id=ab-1-0",
    "/sse/tasks/?tokens=x&token_=y&xtoken=z",
    "/sse/tasks/?heartbeat&task_id==x",
    "/sse/tasks/?task_id=a%ZZb&last_event_id=%",
    "/ws/tasks/?%74oken=escaped&heart%62eat=event",
    "/ws/tasks/#fragment?token=not-in-the-query",
    "/ws/tasks/?heartbeat=event#fragment&token=not-in-the-query",
]
NAMES = ["token", "heartbeat", "task_id", "last_event_id"]


@pytest.mark.parametrize("target", TARGETS)
def test_values_are_those_of_request_query(target: str) -> None:
    request = make_mocked_request("GET", target)
    read = {name: query_value(request, name) for name in NAMES}
    assert read == {name: request.query.get(name) for name in NAMES}


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("/sse/tasks/?task_id=a&task_id=b", "?task_id= is given more than once"),
        ("/sse/tasks/?task_id=a&task%5Fid=a", "?task_id= is given more than once"),
        ("/sse/tasks/?task_id=%ff%fe", "?task_id= is not UTF-8 text"),
    ],
)
def test_a_value_given_twice_or_not_text_is_refused(target: str, said: str) -> None:
    request = make_mocked_request("GET", target)
    with pytest.raises(QueryError, match=said.replace("?", "\\?")):
        query_value(request, "task_id")
    assert query_value(request, "token") is None

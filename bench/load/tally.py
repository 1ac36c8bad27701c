"""What the clients received, counted as it arrives, with as little work per message as
possible so that the load generator is not what is measured.

Every measured event's task id is `bench.<seq>.<send time ns>`, probes are
`probe.<round>.<send time ns>`: latency and loss come from what each client receives.
"""

from __future__ import annotations

import asyncio
from array import array

TASK_ID_KEY = b'"task_id"'


def task_id_of(message: bytes) -> bytes | None:
    """The first task id in a JSON message, found without decoding the JSON."""
    key = message.find(TASK_ID_KEY)
    if key < 0:
        return None
    start = message.find(b'"', key + len(TASK_ID_KEY)) + 1
    end = message.find(b'"', start)
    return message[start:end] if 0 < start <= end else None


class Tally:
    """Counts shared by every client of one run."""

    def __init__(self, events: int, users: int) -> None:
        self.events = events
        self.users = users
        self.expected = 0
        self.delivered = 0
        self.duplicates = 0
        self.misrouted = 0  # events of another user
        self.latencies_ns = array("q")
        self.last_delivery_ns = 0
        self.probed = 0
        self.probes_needed = 0
        self.all_delivered = asyncio.Event()
        self.all_probed = asyncio.Event()

    def wait_for_probes(self, clients: int) -> None:
        self.probes_needed = clients
        self.all_probed.clear()
        if self.probed >= clients:
            self.all_probed.set()


class Receiver:
    """One client: its hello (the server's first message), its probe, its deliveries."""

    __slots__ = (
        "failure", "hello", "probed", "received", "seen", "tally", "transport", "user",
        "user_index",
    )  # fmt: skip

    def __init__(self, tally: Tally, user: str) -> None:
        self.tally = tally
        self.user = user
        self.user_index = int(user)  # events go round-robin: seq % users
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.probed = False
        self.received = 0
        self.seen = bytearray(tally.events)
        self.failure: str | None = None
        self.transport: asyncio.BaseTransport | None = None

    def message(self, message: bytes, now_ns: int) -> None:
        if not self.hello.done():
            self.hello.set_result(None)
            return
        task_id = task_id_of(message)
        if task_id is None:
            return
        kind, _, rest = task_id.partition(b".")
        if kind == b"bench":
            seq, _, sent_ns = rest.partition(b".")
            self._delivered(int(seq), now_ns - int(sent_ns), now_ns)
        elif kind == b"probe" and not self.probed:
            self.probed = True
            tally = self.tally
            tally.probed += 1
            if tally.probed >= tally.probes_needed:
                tally.all_probed.set()

    def _delivered(self, seq: int, latency_ns: int, now_ns: int) -> None:
        tally = self.tally
        if seq % tally.users != self.user_index:
            tally.misrouted += 1
            return
        if self.seen[seq]:
            tally.duplicates += 1
            return
        self.seen[seq] = 1
        self.received += 1
        tally.delivered += 1
        tally.latencies_ns.append(latency_ns)
        tally.last_delivery_ns = now_ns
        if tally.delivered >= tally.expected:
            tally.all_delivered.set()

    def ended(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(reason))

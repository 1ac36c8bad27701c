"""The benchmark scenarios: S1, S1max, S2, S3, S4 and the capacity runs C10k, C15k, C18k
over WebSocket, and the same with -sse."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scenario:
    name: str
    transport: str  # "ws" or "sse"
    clients: int
    users: int  # clients are spread evenly over the users
    events: int  # measured events, spread round-robin over the users; 0: idle clients
    rate: float | None  # events per second; None: as fast as the publisher can

    def user_of_client(self, client: int) -> str:
        return str(client % self.users)

    def user_of_event(self, seq: int) -> str:
        return str(seq % self.users)

    def events_for_user(self, user: str) -> int:
        whole, rest = divmod(self.events, self.users)
        return whole + (1 if int(user) < rest else 0)

    @property
    def expected_deliveries(self) -> int:
        return sum(self.events_for_user(self.user_of_client(c)) for c in range(self.clients))


FULL = {
    "S1": Scenario("S1", "ws", clients=1000, users=100, events=2000, rate=1000.0),
    "S1max": Scenario("S1max", "ws", clients=1000, users=100, events=2000, rate=None),
    "S2": Scenario("S2", "ws", clients=1000, users=1, events=500, rate=None),
    "S3": Scenario("S3", "ws", clients=5000, users=500, events=0, rate=None),
    # 10,000 connections on one worker, 2000 deliveries/s among them.
    "S4": Scenario("S4", "ws", clients=10_000, users=1000, events=4000, rate=200.0),
    # Capacity: N connections on one worker, 10 per user, one event per user per second
    # for 10 s (N deliveries/s); is p99 still under 100 ms?
    **{
        f"C{n // 1000}k": Scenario(f"C{n // 1000}k", "ws", n, n // 10, events=n, rate=n / 10)
        for n in (10_000, 15_000, 18_000)
    },
}
QUICK = {
    "S1": replace(FULL["S1"], clients=50, users=5, events=100),
    "S1max": replace(FULL["S1max"], clients=50, users=5, events=100),
    "S2": replace(FULL["S2"], clients=50, events=100),
    "S3": replace(FULL["S3"], clients=200, users=20),
    "S4": replace(FULL["S4"], clients=300, users=30, events=60, rate=30.0),
    **{
        name: replace(FULL[name], clients=300, users=30, events=90, rate=30.0)
        for name in ("C10k", "C15k", "C18k")
    },
}
NAMES = [*FULL, *(f"{name}-sse" for name in FULL)]


def scenario(name: str, *, quick: bool = False, events: int | None = None) -> Scenario:
    """`S2` or `S2-sse`; `quick` gives the tiny smoke-test version, `events` another
    number of measured events (a longer run reads the server's CPU time steadier)."""
    base_name, _, suffix = name.partition("-")
    table = QUICK if quick else FULL
    if base_name not in table or suffix not in ("", "sse"):
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(NAMES)}")
    chosen = replace(table[base_name], name=name, transport=suffix or "ws")
    if events is None:
        return chosen
    if chosen.events == 0:
        raise ValueError(f"{name} has idle clients: a number of events does not apply")
    if events < 1:
        raise ValueError(f"the number of events must be at least 1, not {events}")
    return replace(chosen, events=events)

"""A real Redis Cluster for the tests: 3 masters and 3 replicas, each a `redis-server`
on free loopback ports in a folder of its own, joined with `redis-cli --cluster create`.

`RedisCluster` starts it, waits (bounded) until every node agrees that the cluster is
up, and drives the two events a service on a cluster must survive: a master that dies
(its replica is promoted) and a slot that moves to another master with its keys.

Use the `redis_cluster` fixture (every process is killed and the folder removed after
the test, whatever happened), or `RedisCluster` as a context manager.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from .processes import free_port
from .waiting import eventually_sync

Address = tuple[str, int]
HOST = "127.0.0.1"
SLOTS = 16384
NODE_TIMEOUT_MS = 1000
START_S = 30.0
FAILOVER_S = 15.0
MOVE_S = 15.0
MIGRATE_BATCH = 100


def require_redis_tools() -> None:
    """Fail with what to install when the programs are missing or too old."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed: the Redis Cluster tests need both "
            "(`apt-get install -y redis-server`, which brings redis-tools; .ci/run installs it)",
            pytrace=False,
        )
    version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    found = re.search(r"v=(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) < (7, 0):
        pytest.fail(
            "the Redis Cluster tests need redis-server 7.0 or later (sharded pub/sub, "
            f"cluster-port); found {version.strip()!r}",
            pytrace=False,
        )


@dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout
        )

    def command(self, *args: Any) -> Any:
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            info: dict[str, Any] = client.info(section)
            return info

    def cluster_info(self) -> dict[str, str]:
        raw = self.command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line
        )  # fmt: skip

    def view(self) -> list[NodeLine]:
        """This node's CLUSTER NODES, parsed."""
        raw = self.command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [NodeLine.parse(line) for line in text.splitlines() if line.strip()]

    def myself(self) -> NodeLine:
        (line,) = [line for line in self.view() if "myself" in line.flags]
        return line

    def log_tail(self, chars: int = 1500) -> str:
        path = self.directory / "redis.log"
        if not path.exists():
            return f"{path}: (no log)"
        return f"{path}:\n{path.read_text(errors='replace')[-chars:]}"


@dataclass
class NodeLine:
    """One line of CLUSTER NODES: who, what role, which slots (migration marks aside)."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    link: str
    slots: frozenset[int]

    @classmethod
    def parse(cls, line: str) -> NodeLine:
        fields = line.split()
        node_id, address, flags, master, *_, link = fields[:8]
        host_port = address.split("@", 1)[0]
        port = int(host_port.rsplit(":", 1)[1]) if ":" in host_port else 0
        slots: set[int] = set()
        for spec in fields[8:]:
            if spec.startswith("["):  # [slot->-id] or [slot-<-id]: a migration in progress
                continue
            low, _, high = spec.partition("-")
            slots.update(range(int(low), int(high or low) + 1))
        return cls(
            node_id=node_id,
            port=port,
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            link=link,
            slots=frozenset(slots),
        )

    @property
    def is_master(self) -> bool:
        return "master" in self.flags


class RedisCluster:
    """3 masters + 3 replicas on free loopback ports, in a temporary folder. `stop()`
    kills every process started and removes the folder."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1) -> None:
        require_redis_tools()
        self.directory = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.replicas_per_master = replicas_per_master
        taken: set[int] = set()
        self.nodes: list[Node] = []
        self._seeds: list[Address] = []
        for _ in range(masters * (1 + replicas_per_master)):
            port, bus_port = self._free_port(taken), self._free_port(taken)
            directory = self.directory / str(port)
            directory.mkdir()
            self.nodes.append(Node(port, bus_port, directory))

    @staticmethod
    def _free_port(taken: set[int]) -> int:
        # free_port() may hand out a port twice; a node needs two (clients, bus).
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.process = subprocess.Popen(
                    self._server_args(node), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            for node in self.nodes:
                eventually_sync(
                    functools.partial(self._answers, node),
                    what=f"cluster node on port {node.port}",
                    timeout=10,
                )
            self._create()
            eventually_sync(
                self._formed, what="the cluster to be up on every node", timeout=START_S
            )
            self._seeds = sorted(self.masters())[:2]
        except BaseException as exc:
            logs = "\n".join(node.log_tail() for node in self.nodes)
            self.stop()
            raise RuntimeError(f"the Redis Cluster did not start: {exc}\n{logs}") from exc

    def _server_args(self, node: Node) -> list[str]:
        return [
            "redis-server",
            "--port", str(node.port),
            "--bind", HOST,
            "--dir", str(node.directory),
            "--logfile", str(node.directory / "redis.log"),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(node.bus_port),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # A replica may always take over, however long ago it last heard its master.
            "--cluster-replica-validity-factor", "0",
            # Replicas stay where they were put: the topology is what the test expects.
            "--cluster-allow-replica-migration", "no",
            "--appendonly", "no",
            "--save", "",
            # A replica's first sync starts at once (diskless sync waits 5 s by default).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    @staticmethod
    def _answers(node: Node) -> bool:
        if node.process is not None and node.process.poll() is not None:
            raise RuntimeError(
                f"redis-server on port {node.port} exited with {node.process.returncode}"
            )
        try:
            with node.client(timeout=0.2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _create(self) -> None:
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        done = subprocess.run(
            [
                "redis-cli", "--cluster", "create", *addresses,
                "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )

    def _formed(self) -> bool:
        """Every node: cluster up, all slots served, every node known and connected, and
        every replica in sync with its master (so that a failover finds the data)."""
        total = len(self.nodes)
        masters = total // (1 + self.replicas_per_master)
        for node in self.nodes:
            try:
                info = node.cluster_info()
                view = node.view()
                replication = node.info("replication")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_slots_ok", 0)) != SLOTS:
                return False
            if int(info.get("cluster_known_nodes", 0)) != total:
                return False
            if sum(1 for line in view if line.is_master) != masters:
                return False
            if any(line.link != "connected" for line in view if "myself" not in line.flags):
                return False
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                if node.process.poll() is None:
                    node.process.kill()
                node.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what the tests ask ----------------------------------------------------------

    @property
    def url(self) -> str:
        """Two of the first masters as seed nodes (the client discovers the rest); the
        same URL for the whole test, whatever happens to those nodes."""
        if not self._seeds:
            raise RuntimeError("the cluster is not started")
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self._seeds)

    def live_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def node(self, address: Address) -> Node:
        for node in self.nodes:
            if node.address == address or node.port == address[1]:
                return node
        raise KeyError(f"no cluster node at {address}")

    def _own_view(self, node: Node) -> NodeLine | None:
        try:
            return node.myself()
        except redis.RedisError:
            return None

    def masters(self) -> list[Address]:
        """Live nodes that are masters by their own account."""
        found = []
        for node in self.live_nodes():
            line = self._own_view(node)
            if line is not None and line.is_master:
                found.append(node.address)
        return found

    def replicas_of(self, address: Address) -> list[Address]:
        """Live nodes that replicate the master at `address`, by their own account."""
        master_id = self.node(address).myself().node_id
        found = []
        for node in self.live_nodes():
            line = self._own_view(node)
            if line is not None and line.master_id == master_id:
                found.append(node.address)
        return found

    @staticmethod
    def slot_of(key: str) -> int:
        return int(key_slot(key.encode()))

    def master_of(self, key: str) -> Address:
        """The live master that serves the key's slot, by its own account (during a
        move, the source until the slot is handed over)."""
        slot = self.slot_of(key)
        owners = []
        for node in self.live_nodes():
            line = self._own_view(node)
            if line is not None and line.is_master and slot in line.slots:
                owners.append(node.address)
        if len(owners) != 1:
            raise AssertionError(f"slot {slot} of {key!r} is claimed by {owners}")
        return owners[0]

    def slot_owner_by(self, node: Node, slot: int) -> int | None:
        """The port of the master that serves `slot`, as `node` sees it."""
        try:
            view = node.view()
        except redis.RedisError:
            return None
        owners = [
            line.port
            for line in view
            if line.is_master and "fail" not in line.flags and slot in line.slots
        ]
        return owners[0] if len(owners) == 1 else None

    def _agreed(self, slot: int, port: int) -> bool:
        """Every live node is up and says `port` serves `slot`."""
        for node in self.live_nodes():
            try:
                if node.cluster_info().get("cluster_state") != "ok":
                    return False
            except redis.RedisError:
                return False
            if self.slot_owner_by(node, slot) != port:
                return False
        return True

    def kill_master_of(self, key: str) -> Address:
        """SIGKILL the master of the key's slot; return its replica, once that replica
        is master of the slot and every surviving node says the cluster is ok."""
        old = self.node(self.master_of(key))
        replicas = [self.node(a) for a in self.replicas_of(old.address)]
        if not replicas:
            raise AssertionError(f"the master on port {old.port} has no replica to promote")
        assert old.process is not None
        old.process.kill()
        old.process.wait()
        slot = self.slot_of(key)

        def promoted() -> Address | None:
            for replica in replicas:
                line = self._own_view(replica)
                if (
                    line is not None
                    and line.is_master
                    and slot in line.slots
                    and self._agreed(slot, replica.port)
                ):
                    return replica.address
            return None

        try:
            return eventually_sync(
                promoted, what=f"a replica of port {old.port} to take over", timeout=FAILOVER_S
            )
        except TimeoutError as exc:
            logs = "\n".join(node.log_tail() for node in replicas)
            raise TimeoutError(f"{exc}\n{logs}") from None

    def move_slot_of(
        self, key: str, to: Address, *, batch: int = MIGRATE_BATCH, pause_s: float = 0.0
    ) -> Address:
        """Live-migrate the key's slot and every key in it to the master at `to`, as
        `redis-cli --cluster reshard` does: IMPORTING / MIGRATING, MIGRATE in batches
        of `batch` keys, then SETSLOT NODE on the destination, the source and every
        other master; return `to` once every node agrees. `pause_s` between batches
        stretches the move, so that clients meet the slot half moved (ASK, TRYAGAIN)."""
        slot = self.slot_of(key)
        source = self.node(self.master_of(key))
        target = self.node(to)
        if source is target:
            raise ValueError(f"slot {slot} is already on port {target.port}")
        if not target.myself().is_master:
            raise ValueError(f"port {target.port} is not a master")
        source_id, target_id = source.myself().node_id, target.myself().node_id
        target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        deadline = time.monotonic() + MOVE_S
        with source.client(timeout=10) as client:
            # In MIGRATING state the source creates no key of the slot: this ends.
            while keys := client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"slot {slot} still has keys on port {source.port}")
                client.execute_command(
                    "MIGRATE", HOST, target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
                if pause_s:
                    time.sleep(pause_s)  # pacing, not a wait: see the docstring
        target.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for address in self.masters():
            if address not in (source.address, target.address):
                self.node(address).command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        eventually_sync(
            lambda: self._agreed(slot, target.port),
            what=f"every node to see slot {slot} on port {target.port}",
            timeout=MOVE_S,
        )
        leftover = source.command("CLUSTER", "COUNTKEYSINSLOT", slot)
        if leftover:
            raise AssertionError(f"{leftover} keys of slot {slot} stayed on port {source.port}")
        return target.address

    def pubsub_clients(self, address: Address) -> list[dict[str, Any]]:
        """CLIENT LIST TYPE pubsub of the node: its subscriber connections (SUBSCRIBE and
        SSUBSCRIBE alike)."""
        with self.node(address).client() as client:
            clients: list[dict[str, Any]] = client.client_list(_type="pubsub")
            return clients

    def client(self) -> redis.RedisCluster:
        """A cluster client (follows MOVED), for reading what the service wrote."""
        host, port = self.masters()[0]
        return redis.RedisCluster(host=host, port=port, socket_connect_timeout=2)


@pytest.fixture
def redis_cluster() -> Iterator[RedisCluster]:
    """A fresh cluster for the test; all its processes are killed afterwards."""
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

"""Machines (nodes) of a run that spans several: their names, and where their cores are numbered.

A run on one machine has no nodes: its cores are ``cpu0``, ``cpu1``... A Ray run names its nodes
``node-a`` (the monitor's), ``node-b``, ... in the order it learns of them; each node's cores
take a range of the recording's core numbers (``first_core`` .. ``first_core + cores - 1``),
shown as ``node-b/cpu0``. Every node is recorded as a ``node`` event (name, id, host, ip,
cores, first_core, local) as it becomes known, and the recording's end row lists them all
(``nodes``, their last word): readers take them from either, checked by `node_details`
(docs/recording-format.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MAX_NODES = 64  # a bound on what connecting processes can make the monitor (and readers) hold
_TEXT = 120


def node_name(index: int) -> str:
    """``node-a`` .. ``node-z``, then ``node-27``, ...: short enough for the Cores panel."""
    return f"node-{chr(ord('a') + index)}" if index < 26 else f"node-{index + 1}"


@dataclass
class Node:
    name: str
    id: str
    host: str = ""
    ip: str = ""
    local: bool = False  # the monitor's node: its cores and processes are sampled by the monitor
    cores: int | None = None  # known once sampled
    first_core: int | None = None

    def detail(self) -> dict[str, Any]:
        """What its ``node`` event says (the name under ``node``: an event's name is its kind)."""
        d = asdict(self)
        d["node"] = d.pop("name")
        return d


def _text(value: Any) -> str:
    return value[:_TEXT] if isinstance(value, str) else ""


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 16 else None


def node_detail(value: Any) -> dict[str, Any] | None:
    """A node as a recording says it (a ``node`` event's detail, an item of the end row's
    ``nodes``), checked: its name a short string, host/ip/id strings, cores and first_core small
    counts or None; None when it names no node."""
    if not isinstance(value, dict) or not isinstance(value.get("node"), str) or not value["node"]:
        return None
    return {"node": value["node"][:_TEXT], "id": _text(value.get("id")), "host": _text(value.get("host")),
            "ip": _text(value.get("ip")), "local": value.get("local") is True,
            "cores": _count(value.get("cores")), "first_core": _count(value.get("first_core"))}


def node_details(value: Any) -> list[dict[str, Any]]:
    """The checked nodes of a list such as the end row's ``nodes`` (at most MAX_NODES, one per name)."""
    out: dict[str, dict[str, Any]] = {}
    for item in value if isinstance(value, list) else []:
        d = node_detail(item)
        if d is not None and (d["node"] in out or len(out) < MAX_NODES):
            out[d["node"]] = d
    return list(out.values())


class Nodes:
    """The monitor's registry of nodes, by the id processes report (a Ray node id)."""

    def __init__(self, local_cores: int) -> None:
        self.by_id: dict[str, Node] = {}
        self.local_cores = local_cores
        self._next_core = local_cores  # the monitor's own cores are 0 .. local_cores - 1

    @property
    def local(self) -> Node | None:
        return next((n for n in self.by_id.values() if n.local), None)

    def add(self, info: Any, *, local: bool = False) -> tuple[Node | None, bool]:
        """The node `info` (``{"id", "host", "ip"}``) names; returns it (None for a bad one or one
        past the bound) and whether it changed (a new node, or the monitor's node found)."""
        if not isinstance(info, dict) or not isinstance(info.get("id"), str) or not info["id"]:
            return None, False
        node_id = info["id"][:_TEXT]
        node = self.by_id.get(node_id)
        changed = False
        if node is None:
            if len(self.by_id) >= MAX_NODES:
                return None, False
            node = self.by_id[node_id] = Node(node_name(len(self.by_id)), node_id, _text(info.get("host")),
                                              _text(info.get("ip")))
            changed = True
        if local and self.local is None:
            node.local, node.cores, node.first_core = True, self.local_cores, 0
            changed = True
        return node, changed

    def place_cores(self, node: Node, count: int) -> bool:
        """Give `node`'s `count` cores their numbers, the first time they are reported."""
        if node.first_core is not None or count <= 0:
            return False
        node.cores, node.first_core = count, self._next_core
        self._next_core += count
        return True

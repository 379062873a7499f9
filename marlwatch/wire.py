"""The telemetry protocol between an instrumented process and the monitor.

Frames travel over anything with `send_bytes`/`recv_bytes` (a `multiprocessing` Pipe today; a
`multiprocessing.connection.Client` socket for a user's own script or a Ray actor later: the
same Connection class). Frames are plain bytes, never pickles:

- control frame: ``b"J"`` + UTF-8 JSON object with a ``type`` ("hello", "event", ...).
- batch frame:   ``b"B"`` + u32 little-endian header length + JSON header + arrays:
  ``ids int32[n]``, ``parents int32[n]``, ``t0 int64[n]``, ``t1 int64[n]``, ``ticks int64[k]``.
  The header carries ``n``, ``k``, ``first_iteration`` (iteration count before the first tick
  of this frame), ``names`` (phase names new since the last frame, in id order) and
  ``counters`` (``[name, t_ns, value]`` rows). Times are the sender's `perf_counter_ns`
  (CLOCK_MONOTONIC, shared by processes on one machine).

Control frames across machines (docs/distributed.md), all optional, so either side may be older:
a hello may carry ``clock`` (``{"v": 1, "boot_id": ...}``: the process answers clock requests)
and ``node`` (``{"id", "host", "ip"}``); the monitor then sends ``clock_req`` (``seq``) on the
same socket and the process answers ``clock_resp`` (``seq``, ``t_ns``) (marlwatch/clock.py).
``nodes`` (``local``, ``nodes``: a cluster's nodes, the monitor's first), ``node`` (the sender's
node, learnt after its hello) and ``sys`` (a node sampler's ``cores``: utilisation per core, and
``procs``: ``[pid, cpu_percent, rss_bytes]``) carry the per-node system view.
"""

from __future__ import annotations

import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

CONTROL = b"J"[0]
BATCH = b"B"[0]
_HEADER = struct.Struct("<I")
# The largest frame a monitor accepts (a full span buffer is ~100 KB): past it, a connection is
# garbage or hostile and is dropped before the monitor allocates what its length field claims.
MAX_FRAME = 64 << 20


# Warm-up progress (`marlwatch.warmup`) travels as two gauges: `warmup/UNIT` = how much is done,
# `warmup/UNIT/needed` = how much the algorithm waits for before its first update.
WARMUP_PREFIX = "warmup/"
WARMUP_NEEDED_SUFFIX = "/needed"


def warmup_gauges(unit: str) -> tuple[str, str]:
    """The gauge names (done, needed) that report a warm-up counted in `unit`."""
    return f"{WARMUP_PREFIX}{unit}", f"{WARMUP_PREFIX}{unit}{WARMUP_NEEDED_SUFFIX}"


def parse_warmup_gauge(name: str) -> tuple[str, bool] | None:
    """`warmup/UNIT` -> (UNIT, False), `warmup/UNIT/needed` -> (UNIT, True), anything else None."""
    if not name.startswith(WARMUP_PREFIX):
        return None
    rest = name[len(WARMUP_PREFIX):]
    needed = rest.endswith(WARMUP_NEEDED_SUFFIX)
    unit = rest[: -len(WARMUP_NEEDED_SUFFIX)] if needed else rest
    return (unit, needed) if unit else None


class Sink(Protocol):
    def send_bytes(self, buf: bytes) -> None: ...

    def close(self) -> None: ...


class ProtocolError(ValueError):
    """A frame that does not follow this protocol."""


@dataclass(frozen=True)
class Control:
    message: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    new_names: list[str]
    ids: np.ndarray
    parents: np.ndarray
    t0: np.ndarray
    t1: np.ndarray
    ticks: np.ndarray
    first_iteration: int
    counters: list[tuple[str, int, float]] = field(default_factory=list)


def encode_control(message: dict[str, Any]) -> bytes:
    return b"J" + json.dumps(message).encode()


def encode_batch(
    *,
    new_names: list[str],
    ids: array,
    parents: array,
    t0: array,
    t1: array,
    n: int,
    ticks: list[int],
    first_iteration: int,
    counters: list[tuple[str, int, float]],
) -> bytes:
    header = json.dumps(
        {"n": n, "k": len(ticks), "first_iteration": first_iteration, "names": new_names, "counters": counters}
    ).encode()
    parts = [b"B", _HEADER.pack(len(header)), header]
    if n:
        parts += [memoryview(ids)[:n], memoryview(parents)[:n], memoryview(t0)[:n], memoryview(t1)[:n]]
    if ticks:
        parts.append(array("q", ticks).tobytes())
    return b"".join(parts)


def decode(frame: bytes) -> Control | Batch:
    if not frame:
        raise ProtocolError("empty frame")
    kind = frame[0]
    if kind == CONTROL:
        try:
            message = json.loads(frame[1:])
        except ValueError as e:
            raise ProtocolError(f"bad control frame: {e}") from None
        if not isinstance(message, dict) or "type" not in message:
            raise ProtocolError("control frame without a type")
        return Control(message)
    if kind != BATCH or len(frame) < 5:
        raise ProtocolError(f"unknown frame type {kind!r}")
    (hlen,) = _HEADER.unpack_from(frame, 1)
    try:
        header = json.loads(frame[5 : 5 + hlen])
        n, k = int(header["n"]), int(header["k"])
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"bad batch header: {e}") from None
    body = memoryview(frame)[5 + hlen :]
    if len(body) != n * 24 + k * 8:
        raise ProtocolError("batch frame length does not match its header")
    off = 0

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(body, dtype=dtype, count=count, offset=off)
        off += a.nbytes
        return a

    ids, parents = take("<i4", n), take("<i4", n)
    t0, t1 = take("<i8", n), take("<i8", n)
    ticks = take("<i8", k)
    counters = [(str(c[0]), int(c[1]), float(c[2])) for c in header.get("counters", [])]
    return Batch(list(header.get("names", [])), ids, parents, t0, t1, ticks, int(header["first_iteration"]), counters)

"""Every figure marlwatch shows, computed in one place (definitions: docs/metrics.md).

`Metrics` eats recording batches in order (live from a run, or read from a file) and hands out
`Snapshot`s. The live app, replay, `summary`, `diff` and the sweep all go through it, so a
number means the same wherever it is shown. Memory is bounded by the number of distinct phases,
cores and processes, plus 8 bytes per learner iteration (kept for latency figures).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch import lifecycle
from marlwatch.aggregates import N_BINS as _N_BINS
from marlwatch.aggregates import bins as _bins
from marlwatch.aggregates import exact_quantiles, group_rows, quantiles_from_hist
from marlwatch.nodes import MAX_NODES, node_detail
from marlwatch.recording import (
    CORE,
    COUNTER,
    END,
    EVENT,
    ITER,
    PROC,
    SPAN,
    SPAN_HIST,
    SPAN_ITER,
    SPAN_SUM,
    STACK,
    Recording,
    RunEnd,
    RunInfo,
    kind_codes,
    kinds_present,
)
from marlwatch.schema import first_codes, one_batch
from marlwatch.validate import (
    MAX_COUNTERS,
    MAX_FUNCTIONS,
    MAX_PHASES,
    PAST_COUNTERS,
    PAST_FUNCTIONS,
    PAST_PHASES,
    NameBound,
    Skipped,
)
from marlwatch.wire import parse_warmup_gauge

TOP_LEVEL = ("sample", "update", "sync")
# Phase latency histograms: marlwatch/aggregates.py (32 log-spaced bins per octave, a percentile
# within 1.1% of the exact one), the same ones the recording's span_hist rows hold.
HISTORY_S = 600  # seconds of IPS history kept for the live plot
STALL_S = 5.0


def is_comm(name: str | None) -> bool:
    """A phase is communication when any segment of its path is `comm`."""
    return name is not None and "comm" in name.split("/")


def is_wait(name: str | None) -> bool:
    """A phase spent waiting for other processes or moving data between them rather than
    computing: everything under `sync` (`sync/wait`, `sync/gather`, `sync/broadcast`, ...), the
    time execution time leaves out (docs/metrics.md). A py-spy flame graph of one shows
    `Connection._recv`, not the algorithm's code."""
    return name is not None and top_of(name) == "sync"


def function_name(frame: str) -> str:
    """A folded-stack frame `backward (torch/_tensor.py:647)` -> `backward (torch/_tensor.py)`."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0] if where else ""
    return f"{name} ({file})" if file else name


def top_segment(phase: str) -> str:
    """`update/comm/gnn` -> `update` (any first path segment, the built-in three or a user's)."""
    return phase.split("/", 1)[0]


def top_of(name: str) -> str:
    """The top-level figure a phase counts in: `sample`, `update`, `sync` or `other`."""
    top = top_segment(name)
    return top if top in TOP_LEVEL else "other"


def counts_in(name: str, top_level: bool, parent_comm: bool) -> tuple[str | None, bool, bool]:
    """Where a span's time counts besides its own phase (docs/metrics.md): the top-level figure
    (sample, update, sync or other) when the span has no parent; communication time when it is
    the outermost communication span (a `comm` span whose parent is not one); and communication
    inside update. Metrics and the per-iteration table both count by this rule."""
    comm = is_comm(name) and not parent_comm
    return (top_of(name) if top_level else None), comm, comm and top_of(name) == "update"


def in_phase(name: str | None, phase: str) -> bool:
    """Whether phase `name` is `phase` or inside it: `update` covers `update` and `update/critic`,
    not `update_x`."""
    return name is not None and (name == phase or name.startswith(phase + "/"))


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values: `np.unique` asked for counts too, because without them it first
    asks whether the array is masked, which imports numpy.ma (~10 ms of every command's start-up)."""
    return np.unique(values, return_counts=True)[0]


def _value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values and how often each occurs: counted with bincount where their
    range is small (a batch's seconds, always, in practice), which needs no sort."""
    low, high = int(values.min()), int(values.max())
    if high - low >= 1 << 20:
        return np.unique(values, return_counts=True)
    counts = np.bincount(values - low)
    present = np.flatnonzero(counts)
    return present + low, counts[present]


def _valid(b: pa.RecordBatch, *columns: str) -> pa.RecordBatch:
    """The rows of `b` where `columns` are all set. A run never writes nulls there; a damaged
    or foreign file may, and they must not reach the numpy code below."""
    if all(b.column(c).null_count == 0 for c in columns):
        return b
    mask = pc.is_valid(b.column(columns[0]))
    for c in columns[1:]:
        mask = pc.and_(mask, pc.is_valid(b.column(c)))
    return b.filter(mask)


@dataclass
class PhaseRow:
    name: str
    total_s: float
    share: float  # of process time (all top-level spans of all processes)
    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    comm: bool
    depth: int  # number of `/` in the name


@dataclass
class ProcRow:
    slot: int
    role: str
    state: str
    iterations: int
    ips: float
    cpu_percent: float | None
    rss_bytes: float | None
    core: int | None
    pid: int | None
    error: str | None = None
    node: str | None = None  # a run across machines: the node it runs on (marlwatch.nodes)
    clock_offset_ms: float | None = None  # its clock minus the monitor's, as estimated (marlwatch.clock)
    clock_rtt_ms: float | None = None  # the round trip of that estimate: |error| <= rtt / 2


@dataclass
class Warmup:
    """A warm-up the learner reported (`marlwatch.warmup`): it makes no update until done."""

    done: float
    needed: float
    unit: str  # what is counted, e.g. "transitions"
    ended_s: float | None = None  # data time of the first report with done >= needed

    @property
    def active(self) -> bool:
        return self.done < self.needed


def _groups(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Each distinct key with the indices of its rows (in row order), the keys in the order they
    first appear: what a loop over the rows would meet first comes first. For reading rows a key
    at a time (a run has a few counter names and processes, but many rows of each)."""
    if not len(keys):
        return
    low = int(keys.min())
    sortable = keys
    if int(keys.max()) - low < 1 << 16:
        sortable = (keys - low).astype(np.uint16)  # numpy's stable sort of 16-bit integers is a radix sort
    order = np.argsort(sortable, kind="stable")
    ordered = sortable[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.append(starts[1:], len(keys))
    for g in np.argsort(order[starts]):  # a group's first row is its earliest: the sort is stable
        yield int(keys[order[starts[g]]]), order[starts[g]: ends[g]]


def with_warmup_gauge(w: Warmup | None, name: str, value: float, t_ns: int) -> Warmup | None:
    """`w` updated by the gauge row `name`=`value` at `t_ns` when that row reports a warm-up
    (`marlwatch.warmup`: wire.warmup_gauges); else `w` unchanged. Metrics and the py-spy
    controller (which says how far a warm-up is while a capture waits for it) both read it so."""
    warm = parse_warmup_gauge(name)
    if warm is None:
        return w
    unit, is_needed = warm
    if w is None or w.unit != unit:  # a learner reports one warm-up; the latest unit wins
        w = Warmup(done=0.0, needed=math.inf, unit=unit)
    if is_needed:
        w.needed = value
    else:
        w.done = value
    if w.ended_s is None and not w.active:
        w.ended_s = t_ns / 1e9
    return w


@dataclass
class Snapshot:
    info: RunInfo | None
    t_s: float  # data time: the latest moment the rows fed so far describe
    wall_s: float  # from the run's start (t = 0) to the main loop's last iteration
    iterations: int
    ips: float  # iterations after the first / steady_s
    ips_now: float  # over the last few seconds (after the first iteration)
    ips_history: list[float]  # iterations per second, one value per second, oldest first
    # Start-up: from the run's start to the end of the main loop's first iteration (spawning,
    # imports, the first weights and rollouts); None until that iteration ends. The first
    # iteration is start-up, not steady state: IPS, latencies and span figures leave it out.
    startup_s: float | None
    steady_s: float  # from the end of the first iteration to the end of the last
    steady_iterations: int  # the iterations in steady_s: all but the first
    process_s: float  # all top-level span time, all processes (after their first iteration)
    exec_s: float  # sample + update time, all processes (the study's execution time)
    shares: dict[str, float]  # sample / update / sync / other, of process time; sum to 1
    comm_share: float  # communication time / execution time
    comm_share_update: float  # communication inside update / update time
    comm_s: float
    update_s: float
    phases: list[PhaseRow]
    iteration_ms: dict[str, float]  # p50/p95/p99 of the main loop's iteration latency (after the first)
    cores_mean: list[float]
    cores_now: list[float]
    procs: list[ProcRow]
    counters: dict[str, float]
    returns: list[float]  # recent episode returns (gauge `episode_return`), oldest first
    complete: bool  # the end-of-run marker was seen
    events: list[dict[str, Any]] = field(default_factory=list)
    # Latency-bounded throughput, when a bound is set (`--latency-bound MS`): IPS counting only
    # iterations whose latency stayed within the bound, and the fraction that did.
    latency_bound_ms: float | None = None
    bounded_ips: float | None = None
    bound_met: float | None = None
    # Whether the p99 iteration latency is within the bound: what makes a setting count in the
    # latency-bounded choice among settings (`latency_bounded_choice`, `sweep --latency-bound`).
    p99_within_bound: bool | None = None
    # py-spy samples seen so far (rows of kind `stack`): phase -> leaf function -> samples.
    stacks: dict[str, dict[str, int]] = field(default_factory=dict)
    # The learner's warm-up, when it reported one; while `warmup.active` there has been no model
    # update, so update and communication shares of zero are not measurements of the algorithm.
    warmup: Warmup | None = None
    # The nodes of a run across machines (``node`` events: name, id, host, ip, cores, first_core,
    # local), in the order they were named; empty on one machine.
    nodes: list[dict[str, Any]] = field(default_factory=list)

    def core_label(self, core: int) -> str:
        """``cpu3`` on one machine; ``node-b/cpu1`` when the run spans several."""
        if len(self.nodes) > 1:
            for n in self.nodes:
                first, count = n.get("first_core"), n.get("cores")
                if isinstance(first, int) and isinstance(count, int) and first <= core < first + count:
                    return f"{n.get('node')}/cpu{core - first}"
        return f"cpu{core}"

    def phase_samples(self, phase: str) -> dict[str, int]:
        """py-spy's samples taken while `phase` or a phase below it ran, per function (leaf frame)."""
        total: dict[str, int] = {}
        for name, funcs in self.stacks.items():
            if in_phase(name, phase):
                for f, c in funcs.items():
                    total[f] = total.get(f, 0) + c
        return total

    def top_functions(self, phase: str, n: int = 10) -> list[tuple[str, int]]:
        """The functions py-spy found running most often while `phase` or a phase below it ran."""
        return sorted(self.phase_samples(phase).items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    @property
    def hottest(self) -> PhaseRow | None:
        leaves = [p for p in self.phases if p.depth > 0] or self.phases
        return max(leaves, key=lambda p: p.total_s, default=None)

    @property
    def hottest_work(self) -> PhaseRow | None:
        """The hottest phase that is not a wait (`is_wait`), leaves first as for `hottest`; the
        hottest phase when every phase is a wait. What the app selects (and `f` profiles) first."""
        work = [p for p in self.phases if not is_wait(p.name)]
        leaves = [p for p in work if p.depth > 0] or work
        return max(leaves, key=lambda p: p.total_s, default=None) or self.hottest

    def to_json(self) -> dict[str, Any]:
        info = self.info
        return {
            "algo": info.algo if info else None,
            "env": info.env if info else None,
            "agents": info.agents if info else None,
            "workers": info.workers if info else None,
            "complete": self.complete,
            "iterations": self.iterations,
            "wall_s": self.wall_s,
            "startup_s": self.startup_s,
            "steady_s": self.steady_s,
            "steady_iterations": self.steady_iterations,
            "ips": self.ips,
            "process_s": self.process_s,
            "exec_s": self.exec_s,
            "shares": self.shares,
            "comm_share": self.comm_share,
            "comm_share_update": self.comm_share_update,
            "iteration_ms": self.iteration_ms,
            **({"warmup": asdict(self.warmup) | {"active": self.warmup.active}} if self.warmup else {}),
            **({"latency_bound": {"bound_ms": self.latency_bound_ms, "ips": self.bounded_ips,
                                  "fraction_met": self.bound_met, "p99_within": self.p99_within_bound}}
               if self.latency_bound_ms is not None else {}),
            "phases": {
                p.name: {k: v for k, v in asdict(p).items() if k not in ("name",)} for p in self.phases
            },
            "cores": [round(c, 2) for c in self.cores_mean],
            **({"core_labels": [self.core_label(i) for i in range(len(self.cores_mean))], "nodes": self.nodes}
               if self.nodes else {}),
            "procs": [asdict(p) for p in self.procs],
            "counters": self.counters,
        }


@dataclass
class _Phase:
    total_ns: int = 0
    count: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_N_BINS, np.int64))
    # Every duration, for exact percentiles (Metrics(exact=True): 8 bytes a span); else None.
    durations: list[np.ndarray] | None = None


@dataclass
class _Proc:
    slot: int
    role: str
    state: str = lifecycle.STARTING
    error: str | None = None
    iterations: int = 0
    first_tick: int | None = None  # end of its first iteration: the end of its start-up
    first_tick_iter: int = 0  # its iteration count at that tick
    last_tick: int | None = None
    cpu: float | None = None
    rss: float | None = None
    pid: int | None = None
    core: int | None = None
    node: str | None = None
    clock: tuple[float, float] | None = None  # the latest estimate: offset, rtt (ms)


@dataclass
class _Totals:
    """Span time of one set of spans: the steady state, or one process's first iteration."""

    phases: dict[str, _Phase] = field(default_factory=dict)
    top_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*TOP_LEVEL, "other"), 0))
    comm_ns: int = 0
    comm_update_ns: int = 0
    exact: bool = False  # keep every span's duration (exact percentiles)

    def _phase(self, name: str) -> _Phase:
        ph = self.phases.get(name)
        if ph is None:
            ph = self.phases[name] = _Phase(durations=[] if self.exact else None)
        return ph

    def add(self, names: list[str], parents: list[str], codes: np.ndarray, parent_codes: np.ndarray,
            dur: np.ndarray, count: np.ndarray | None = None) -> None:
        """Add spans given as dictionary codes into `names` and `parents` (len(parents): none).
        With `count`, each row stands for `count` spans of summed duration `dur` (span_sum rows)."""
        n_parents = len(parents) + 1
        key = codes * n_parents + parent_codes
        size = len(names) * n_parents
        if size <= 1 << 20:
            counts = np.bincount(key, weights=count, minlength=size)
            # float64 sums are exact while a batch's total stays under 2^53 ns (104 days)
            totals = np.bincount(key, weights=dur, minlength=size)
            present = np.flatnonzero(counts)
        else:  # many names and parents: a table of every pair would take gigabytes, sort instead
            present, inverse = np.unique(key, return_inverse=True)
            counts = dict(zip(present.tolist(), np.bincount(inverse, weights=count).tolist(), strict=True))
            totals = dict(zip(present.tolist(), np.bincount(inverse, weights=dur).tolist(), strict=True))
        for k in present.tolist():
            name = names[k // n_parents]
            j = k % n_parents
            parent = parents[j] if j < len(parents) else None
            total, n = int(round(totals[k])), int(round(counts[k]))
            ph = self._phase(name)
            ph.total_ns += total
            ph.count += n
            top, comm, comm_update = counts_in(name, parent is None, is_comm(parent))
            if top is not None:
                self.top_ns[top] += total
            if comm:
                self.comm_ns += total
            if comm_update:
                self.comm_update_ns += total
        if count is None:
            self.add_hist(names, codes, _bins(dur))
            if self.exact and len(codes):
                order = np.argsort(codes, kind="stable")
                cuts = np.flatnonzero(np.diff(codes[order])) + 1
                for chunk in np.split(order, cuts):
                    self._phase(names[codes[chunk[0]]]).durations.append(dur[chunk])

    def add_hist(self, names: list[str], codes: np.ndarray, bins: np.ndarray, count: np.ndarray | None = None) -> None:
        """Add to the phases' histograms: a span (or `count` of them) in bin `bins` of phase `codes`."""
        flat = np.bincount(codes * _N_BINS + bins, weights=count, minlength=len(names) * _N_BINS)
        flat = flat.reshape(len(names), _N_BINS).astype(np.int64, copy=False)
        for k in np.flatnonzero(flat.any(axis=1)):  # the dictionary also holds names of other rows
            self._phase(names[k]).hist += flat[k]

    def plus(self, other: _Totals) -> _Totals:
        """A new _Totals with both sets of spans."""
        out = _Totals({n: _Phase(p.total_ns, p.count, p.hist.copy(), None if p.durations is None else list(p.durations))
                       for n, p in self.phases.items()},
                      dict(self.top_ns), self.comm_ns + other.comm_ns, self.comm_update_ns + other.comm_update_ns,
                      self.exact)
        for name, p in other.phases.items():
            q = out._phase(name)
            q.total_ns, q.count, q.hist = q.total_ns + p.total_ns, q.count + p.count, q.hist + p.hist
            if q.durations is not None and p.durations is not None:
                q.durations += p.durations
        for k, v in other.top_ns.items():
            out.top_ns[k] += v
        return out


# A nested span reaches a process's telemetry before the top-level span around it closes (a span
# is sent when it ends). Counted at once, the phases under an `update` still running would add
# to communication and to their own rows while `update` itself did not yet: comm/execution read
# 160 % for a while in a run of 15-second iterations. So a nested span is counted once its
# process has closed a top-level span or ended an iteration after it (docs/metrics.md), or once
# it is HOLD_S of data time old, or at the end of the run; HOLD_ROWS bounds what is held.
HOLD_S = 60.0
HOLD_ROWS = 1 << 20


class Metrics:
    """Every figure, fed batch by batch. What allocates per name is bounded (marlwatch/validate.py):
    phases past MAX_PHASES names, counters past MAX_COUNTERS and sampled functions past
    MAX_FUNCTIONS are left out, and counted in `skipped` (the reader's, when reading a file, so
    that one warning says all)."""

    def __init__(self, info: RunInfo | None = None, skipped: Skipped | None = None, exact: bool = False) -> None:
        """`exact`: phase percentiles from every span's duration (8 bytes a span kept) rather
        than from the histograms (within aggregates.RELATIVE_ERROR of them)."""
        self.info = info
        self.skipped = skipped if skipped is not None else Skipped()
        self.phase_names = NameBound(MAX_PHASES)
        self.functions = 0  # distinct (phase, function) pairs in self.stacks
        # Spans of a process's first iteration (its recorded `iter` is 0) are start-up: they go to
        # `startup` (per process slot) and count in the figures only for a process that never
        # ends an iteration (a helper that does not tick), so its time is not lost.
        self.exact = exact
        self.steady = _Totals(exact=exact)
        self.startup: dict[int, _Totals] = {}
        # Nested spans whose top-level span is still open (HOLD_S), and per process the latest
        # end of a top-level span or iteration: what closes them.
        self._held: list[pa.RecordBatch] = []
        self._held_rows = 0
        self._closed_ns: dict[int, int] = {}
        self.t_ns = 0
        self.procs: dict[int, _Proc] = {}
        if info:
            for slot, role in info.procs.items():
                self.procs[int(slot)] = _Proc(int(slot), role, core=info.pinning.get(slot))
        self.main_ticks: list[np.ndarray] = []  # the main process's iteration times
        self.main_iterations = 0
        # The run's main process, whose iterations are the run's: the learner (slot 0) of a built-in
        # run; for a command or `listen`, the first process that ticks (the command itself may be a
        # shell or launcher script that never does). docs/metrics.md.
        self.main_slot: int | None = 0 if info is None or info.launcher == "builtin" else None
        self.per_second: deque[tuple[int, int]] = deque(maxlen=HISTORY_S)
        self.core_sum: np.ndarray = np.zeros(0)
        self.core_n: np.ndarray = np.zeros(0)
        self.core_now: np.ndarray = np.zeros(0)
        self.counters: dict[str, float] = {}
        self.returns: deque[float] = deque(maxlen=200)
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        self.complete = False
        self.stacks: dict[str, dict[str, int]] = {}  # bounded by phases x functions sampled
        self.warmup: Warmup | None = None
        self.nodes: dict[str, dict[str, Any]] = {}  # by name, from `node` events (bounded: marlwatch.nodes)
        # `marlwatch run --latency-bound MS` stores the bound in the run info, so the live view,
        # replay and summary of that recording all show it; `summary --latency-bound` overrides.
        bound = info.extra.get("latency_bound_ms") if info else None
        self.latency_bound_ms: float | None = float(bound) if isinstance(bound, int | float) else None

    # -- feeding --------------------------------------------------------------------------
    def add_all(self, batches: Iterable[pa.RecordBatch]) -> Metrics:
        """Add every batch of a recording read to its end: nested spans still held then count too."""
        for b in batches:
            self.add(b)
        self.release_held(everything=True)
        return self

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        t = batch.column("t_ns")
        tmax = pc.max(t).as_py()
        if tmax is not None:
            self.t_ns = max(self.t_ns, tmax)
        # One hash pass over `kind` (shared with the reader's checks), then integer masks: a
        # string compare per kind costs more.
        kinds, codes_all = kind_codes(batch)
        codes = None if len(kinds) == 1 and batch.column("kind").null_count == 0 else codes_all
        # The dictionary may name kinds no row of this batch has (a file's dictionary is shared
        # by all its batches): what the rows hold is what their codes say.
        present = kinds_present(kinds, codes_all)

        def rows(k: str, columns: list[str]) -> pa.RecordBatch:
            # Only the columns a kind uses are filtered (copied): most of a batch is spans.
            b = batch.select(columns)
            return b if codes is None else b.filter(pa.array(codes == kinds.index(k)))

        if SPAN in present:
            self._spans(batch, None if codes is None else codes == kinds.index(SPAN), hold=True)
        # Aggregates share their batch with other rows (a group's iterations, counters, samples):
        # taken out first, the work on them is sized by their own rows, not the whole batch's.
        if SPAN_SUM in present:
            self._spans(rows(SPAN_SUM, ["proc", "name", "parent", "dur_ns", "iter", "value"]), aggregate=True)
        if SPAN_HIST in present:
            self._hists(rows(SPAN_HIST, ["proc", "name", "iter", "value", "bin"]), None)
        if ITER in present:
            self._iters(_valid(rows(ITER, ["proc", "t_ns", "iter"]), "proc", "t_ns", "iter"))
        if CORE in present:
            self._cores(_valid(rows(CORE, ["core", "value"]), "core", "value"))
        if PROC in present:
            self._proc_samples(rows(PROC, ["proc", "name", "value"]))
        if COUNTER in present:
            self._counters(_valid(rows(COUNTER, ["name", "t_ns", "value"]), "name", "t_ns", "value"))
        if EVENT in present:
            self._events(rows(EVENT, ["proc", "name", "t_ns", "text"]))
        if STACK in present:
            self._stack_samples(rows(STACK, ["name", "text", "value"]))
        if END in present:
            self.complete = True
            for text in rows(END, ["text"]).column("text").to_pylist():
                end = RunEnd.parse(text)
                if end.nodes:  # the nodes' last word (the events before say the same, bit by bit)
                    self.nodes = {n["node"]: n for n in end.nodes}
        self.release_held(everything=self.complete)

    def release_held(self, everything: bool = False) -> None:
        """Count the held nested spans whose process has closed what was open around them (see
        HOLD_S); with `everything`, all of them (the run is over)."""
        if not self._held:
            return
        held = one_batch(self._held)
        procs = pc.fill_null(held.column("proc"), 0).to_numpy(zero_copy_only=False)
        end = held.column("t_ns").to_numpy(zero_copy_only=False) + held.column("dur_ns").to_numpy(zero_copy_only=False)
        ready = ~self._waiting(procs, end)
        if everything or self._held_rows > HOLD_ROWS:
            ready[:] = True
        self._held, self._held_rows = [], 0
        if not ready.all():
            self._held, self._held_rows = [held.filter(pa.array(~ready))], int((~ready).sum())
        if ready.any():
            self._spans(held if ready.all() else held.filter(pa.array(ready)))

    def _waiting(self, procs: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Which nested spans (by process and end time) wait: their process has closed no top-level
        span nor ended an iteration since they ended, and they are not yet HOLD_S old."""
        slots, inverse = np.unique(procs, return_inverse=True)
        closed = np.array([self._closed_ns.get(s, -1) for s in slots.tolist()], np.int64)[inverse]
        return (end > closed) & (end > self.t_ns - int(HOLD_S * 1e9))

    def _close(self, slot: int, t: int) -> None:
        """Process `slot` closed a top-level span or ended an iteration at `t`."""
        if t > self._closed_ns.get(slot, -1):
            self._closed_ns[slot] = t

    def _spans(self, b: pa.RecordBatch, mask: np.ndarray | None = None, aggregate: bool = False,
               hold: bool = False) -> None:
        """Add the span rows of `b` (where `mask` is true; all rows when it is None); with
        `aggregate`, its span_sum rows, each `value` spans of summed duration `dur_ns`; with
        `hold`, nested spans whose top-level span is still open wait (HOLD_S).

        Works on the whole batch with numpy masks, because filtering the batch first copies its
        strings; groups by (name, parent) with dictionary codes and bincount, because Acero's
        group_by costs ~5 ms a call: together they made `summary` of 10M spans twice as slow."""
        names, codes, ok = self._phase_codes(b, mask)
        parent_enc = b.column("parent")
        if not pa.types.is_dictionary(parent_enc.type):
            parent_enc = pc.dictionary_encode(parent_enc)
        parents = parent_enc.dictionary.to_pylist()
        parent_codes = pc.fill_null(parent_enc.indices, len(parents)).to_numpy(zero_copy_only=False)
        dur = b.column("dur_ns")
        if dur.null_count:  # a damaged file: such rows are skipped
            ok &= pc.is_valid(dur).to_numpy(zero_copy_only=False)
            dur = pc.fill_null(dur, 0)
        dur = dur.to_numpy(zero_copy_only=False)
        count = b.column("value").to_numpy(zero_copy_only=False) if aggregate else None
        procs = pc.fill_null(b.column("proc"), 0).to_numpy(zero_copy_only=False)
        if hold:
            end = pc.fill_null(b.column("t_ns"), 0).to_numpy(zero_copy_only=False) + dur
            top = ok & (parent_codes == len(parents))
            for slot in _distinct(procs[top]).tolist():
                self._close(slot, int(end[top & (procs == slot)].max()))
            wait = ok & (parent_codes != len(parents)) & self._waiting(procs, end)
            if wait.any():
                self._held.append(b.filter(pa.array(wait)))
                self._held_rows += int(wait.sum())
                ok &= ~wait
        names, codes = self._bounded(names, codes, ok)
        if not names:
            return
        # A span without an iteration (a damaged file) counts as steady state.
        first = (pc.fill_null(b.column("iter"), -1).to_numpy(zero_copy_only=False) == 0) & ok
        steady = ok & ~first

        def part(sel: np.ndarray | None) -> tuple:
            if sel is None:
                return names, parents, codes, parent_codes, dur, count
            return names, parents, codes[sel], parent_codes[sel], dur[sel], None if count is None else count[sel]

        if steady.all():
            self.steady.add(*part(None))
        elif steady.any():
            self.steady.add(*part(steady))
        if first.any():
            for slot in _distinct(procs[first]):
                self.startup.setdefault(int(slot), _Totals(exact=self.exact)).add(*part(first & (procs == slot)))

    def _hists(self, b: pa.RecordBatch, mask: np.ndarray | None) -> None:
        """Add span_hist rows: `value` spans in histogram bin `bin` of phase `name`; of process
        `proc`'s first iteration (start-up) when `iter` is 0, else steady state."""
        names, codes, ok = self._phase_codes(b, mask)
        ok &= pc.is_valid(b.column("bin")).to_numpy(zero_copy_only=False)
        names, codes = self._bounded(names, codes, ok)
        if not names:
            return
        bins = pc.fill_null(b.column("bin"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        count = pc.fill_null(b.column("value"), 0).to_numpy(zero_copy_only=False)
        first = (pc.fill_null(b.column("iter"), -1).to_numpy(zero_copy_only=False) == 0) & ok
        steady = ok & ~first
        if steady.any():
            self.steady.add_hist(names, codes[steady], bins[steady], count[steady])
        if first.any():
            procs = pc.fill_null(b.column("proc"), 0).to_numpy(zero_copy_only=False)
            for slot in _distinct(procs[first]):
                sel = first & (procs == slot)
                self.startup.setdefault(int(slot), _Totals(exact=self.exact)).add_hist(names, codes[sel], bins[sel],
                                                                                     count[sel])

    @staticmethod
    def _phase_codes(b: pa.RecordBatch, mask: np.ndarray | None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The `name` dictionary, each row's code into it (-1: null) and the rows to take."""
        enc = b.column("name")
        if not pa.types.is_dictionary(enc.type):
            enc = pc.dictionary_encode(enc)
        names = enc.dictionary.to_pylist()
        codes = first_codes(names, pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64))
        ok = codes >= 0 if mask is None else (codes >= 0) & mask
        return names, codes, ok

    def _bounded(self, names: list[str], codes: np.ndarray, ok: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The names the span rows (where `ok`) use, as many as the phase bound allows, and the
        rows' codes into that list (rows of other names are taken out of `ok` and counted).

        The batch's dictionary also holds other rows' names (counters, events), and a hostile
        batch can hold tens of thousands: the tables of _Totals.add are sized by this list."""
        present = np.flatnonzero(np.bincount(codes[ok], minlength=len(names)))
        admitted = np.asarray(self.phase_names.admit([names[k] for k in present]), bool)
        if not admitted.all():
            allowed = np.zeros(len(names), bool)
            allowed[present[admitted]] = True
            refused = ok & ~allowed[codes]
            self.skipped.rows[PAST_PHASES] += int(refused.sum())
            ok &= ~refused
            present = present[admitted]
        compact = np.zeros(len(names), np.int64)
        compact[present] = np.arange(len(present))
        return [names[k] for k in present], compact[codes]

    def _iters(self, b: pa.RecordBatch) -> None:
        procs = b.column("proc").to_numpy(zero_copy_only=False)
        times = b.column("t_ns").to_numpy(zero_copy_only=False)
        iters = b.column("iter").to_numpy(zero_copy_only=False)
        for slot in _distinct(procs):
            sel = procs == slot
            p = self._proc(int(slot))
            ts = times[sel]
            if p.first_tick is None or int(ts.min()) < p.first_tick:
                k = int(np.argmin(ts))
                p.first_tick, p.first_tick_iter = int(ts[k]), int(iters[sel][k])
            p.iterations = max(p.iterations, int(iters[sel].max()))
            if p.state == lifecycle.STARTING:  # its hello is in a later batch
                p.state = lifecycle.RUNNING
            p.last_tick = int(ts.max())
            self._close(int(slot), p.last_tick)
            if self.main_slot is None:
                self.main_slot = int(slot)
            if int(slot) == self.main_slot:
                self.main_ticks.append(ts.astype(np.int64))
                self.main_iterations = p.iterations
                for sec, count in zip(*_value_counts(ts // 1_000_000_000), strict=True):
                    if self.per_second and self.per_second[-1][0] == sec:
                        self.per_second[-1] = (int(sec), self.per_second[-1][1] + int(count))
                    else:
                        self.per_second.append((int(sec), int(count)))

    def _cores(self, b: pa.RecordBatch) -> None:
        core = b.column("core").to_numpy(zero_copy_only=False).astype(np.int64)
        value = b.column("value").to_numpy(zero_copy_only=False)
        ok = (core >= 0) & (core < 4096)
        if not ok.all():  # only a damaged file numbers its cores like that
            core, value = core[ok], value[ok]
        if len(core) == 0:
            return
        n = int(core.max()) + 1
        if n > len(self.core_sum):
            grow = n - len(self.core_sum)
            self.core_sum = np.concatenate([self.core_sum, np.zeros(grow)])
            self.core_n = np.concatenate([self.core_n, np.zeros(grow)])
            self.core_now = np.concatenate([self.core_now, np.zeros(grow)])
        self.core_sum += np.bincount(core, weights=value, minlength=len(self.core_sum))
        self.core_n += np.bincount(core, minlength=len(self.core_n))
        self.core_now[core] = value  # the last sample of each core wins

    def _proc_samples(self, b: pa.RecordBatch) -> None:
        """Each process's latest CPU and memory sample. By process, not row by row: a run has a few
        processes, but two rows each ten times a second (650,000 in an hour of 8 workers)."""
        labels, codes, _ = self._phase_codes(b, None)  # the reader let through only named rows
        values = b.column("value").to_numpy(zero_copy_only=False)
        wanted = {code: attr for code, attr in ((labels.index(n), a) for n, a in
                                                (("cpu_percent", "cpu"), ("rss_bytes", "rss")) if n in labels)}
        for slot, rows in _groups(b.column("proc").to_numpy(zero_copy_only=False)):
            p = self._proc(slot)
            for code, attr in wanted.items():
                mine = rows[codes[rows] == code]
                if len(mine):
                    setattr(p, attr, float(values[mine[-1]]))

    def _counters(self, b: pa.RecordBatch) -> None:
        """Per counter name, in the order the names first appear (which ones the bound admits):
        `episodes` summed, every other name's last value kept, each `episode_return` listed.
        By name, not row by row: a run reports a few names, but a row per episode and per
        update (150,000 rows in a 12-minute MADDPG run, which a loop over rows took 0.3 s to read)."""
        labels, codes, _ = self._phase_codes(b, None)  # no nulls here: _valid took them out
        values = b.column("value").to_numpy(zero_copy_only=False)
        warm_rows = []
        for code, rows in _groups(codes):
            name = labels[code]
            if name not in self.counters and len(self.counters) >= MAX_COUNTERS:
                self.skipped.rows[PAST_COUNTERS] += len(rows)
                continue
            if name == "episodes":
                self.counters[name] = self.counters.get(name, 0.0) + float(values[rows].sum())
            else:
                self.counters[name] = float(values[rows[-1]])
            if name == "episode_return":
                self.returns.extend(values[rows].tolist())
            if parse_warmup_gauge(name) is not None:
                warm_rows.append(rows)
        if warm_rows:  # a warm-up's two gauges, row by row: when it ended depends on how they interleave
            times = b.column("t_ns").to_numpy(zero_copy_only=False)
            for i in np.sort(np.concatenate(warm_rows)).tolist():
                self.warmup = with_warmup_gauge(self.warmup, labels[codes[i]], float(values[i]), int(times[i]))

    def _stack_samples(self, b: pa.RecordBatch) -> None:
        for name, stack, count in zip(b.column("name").to_pylist(), b.column("text").to_pylist(),
                                      b.column("value").to_pylist(), strict=True):
            if name is None or not stack:
                continue
            if not self.phase_names.admit([name])[0]:
                self.skipped.rows[PAST_PHASES] += 1
                continue
            funcs = self.stacks.setdefault(name, {})
            leaf = function_name(stack.rsplit(";", 1)[-1])
            if leaf not in funcs:
                if self.functions >= MAX_FUNCTIONS:
                    self.skipped.rows[PAST_FUNCTIONS] += 1
                    continue
                self.functions += 1
            funcs[leaf] = funcs.get(leaf, 0) + int(count or 0)

    def _events(self, b: pa.RecordBatch) -> None:
        for slot, name, t, text in zip(b.column("proc").to_pylist(), b.column("name").to_pylist(),
                                       b.column("t_ns").to_pylist(), b.column("text").to_pylist(), strict=True):
            try:
                detail = json.loads(text) if text else {}
            except ValueError:
                detail = {}
            if not isinstance(detail, dict):
                detail = {}
            self.events.append({"t_s": t / 1e9, "proc": slot, "name": name, **detail})
            if slot is None:
                node = node_detail(detail) if name == "node" else None
                if node is not None and (node["node"] in self.nodes or len(self.nodes) < MAX_NODES):
                    self.nodes[node["node"]] = node  # the latest says most (its cores, once sampled)
                continue
            p = self._proc(slot)
            p.state, p.error = lifecycle.after(p.state, p.error, name, detail)  # as the monitor did
            if isinstance(detail.get("node"), str) and name in ("started", "on_node"):
                p.node = detail["node"]
            if name == "clock" and isinstance(detail.get("offset_ns"), int | float) \
                    and isinstance(detail.get("rtt_ns"), int | float):
                p.clock = (detail["offset_ns"] / 1e6, detail["rtt_ns"] / 1e6)
            if name == "started":
                p.pid, p.core = detail.get("pid"), detail.get("core", p.core)
                if isinstance(detail.get("role"), str):  # processes that connected by themselves
                    p.role = detail["role"]

    def _proc(self, slot: int | None) -> _Proc:
        slot = int(slot or 0)
        if slot not in self.procs:
            self.procs[slot] = _Proc(slot, "main" if slot == 0 else f"worker {slot}")
        return self.procs[slot]

    # -- reading --------------------------------------------------------------------------
    def iteration_times_ns(self) -> np.ndarray:
        """The main loop's iteration end times (ns since run start)."""
        if not self.main_ticks:
            return np.zeros(0, np.int64)
        if len(self.main_ticks) > 1:
            self.main_ticks = [np.concatenate(self.main_ticks)]
        return self.main_ticks[0]

    def iteration_latencies_ns(self) -> np.ndarray:
        """The main loop's iteration latencies after the first (the first is start-up)."""
        return np.diff(self.iteration_times_ns())

    def _figures(self) -> _Totals:
        """The span time the figures count: steady state, plus the start-up of processes that
        never ended an iteration."""
        totals = self.steady
        for slot, startup in self.startup.items():
            p = self.procs.get(slot)
            if p is None or p.first_tick is None:
                totals = totals.plus(startup)
        return totals

    def snapshot(self) -> Snapshot:
        totals = self._figures()
        top_ns = totals.top_ns
        process_ns = sum(top_ns.values())
        exec_ns = top_ns["sample"] + top_ns["update"]
        ticks = self.iteration_times_ns()
        iterations = self.main_iterations
        main = self.procs.get(self.main_slot) if self.main_slot is not None else None
        first_tick = main.first_tick if main is not None else None
        wall_ns = int(ticks[-1]) if len(ticks) else self.t_ns
        steady_ns = int(ticks[-1]) - first_tick if first_tick is not None else 0
        steady_iterations = iterations - main.first_tick_iter if main is not None else 0
        # Current IPS: ticks in the last 3 s of data time, never reaching back into start-up.
        lo = max(self.t_ns - 3_000_000_000, first_tick) if first_tick is not None else self.t_ns
        window_s = (self.t_ns - lo) / 1e9
        recent = np.count_nonzero(ticks > lo) if len(ticks) else 0
        lat = self.iteration_latencies_ns()
        lat_q = np.percentile(lat, [50, 95, 99]) / 1e6 if len(lat) else [math.nan] * 3
        bounded: tuple[float | None, float | None] = (None, None)
        if self.latency_bound_ms is not None:
            bounded = bounded_throughput(lat, steady_ns / 1e9, self.latency_bound_ms)
        phases = []
        for name in sorted(totals.phases):
            ph = totals.phases[name]
            if ph.durations is not None and ph.count == sum(len(d) for d in ph.durations):
                q = exact_quantiles(np.concatenate(ph.durations) if ph.durations else np.zeros(0), (0.5, 0.95, 0.99))
            else:
                q = quantiles_from_hist(ph.hist, (0.5, 0.95, 0.99))
            phases.append(PhaseRow(
                name=name, total_s=ph.total_ns / 1e9, share=ph.total_ns / process_ns if process_ns else 0.0,
                count=ph.count, mean_ms=ph.total_ns / ph.count / 1e6 if ph.count else 0.0,
                p50_ms=q[0] / 1e6, p95_ms=q[1] / 1e6, p99_ms=q[2] / 1e6, comm=is_comm(name), depth=name.count("/"),
            ))
        if self.per_second:
            # Complete seconds up to now: the second in progress is not a rate yet (it read as a
            # dip at the plot's right edge), and the seconds of a stall count as zeros. A finished
            # run's plot ends with its last second of iterations (not with the shutdown after it).
            end = self.per_second[-1][0] + 1 if self.complete else self.t_ns // 1_000_000_000
            counts = dict(self.per_second)
            history = [float(counts.get(s, 0)) for s in range(max(self.per_second[0][0], end - HISTORY_S), end)]
        else:
            history = []
        procs = []
        for slot in sorted(self.procs):
            p = self.procs[slot]
            state = p.state
            if state == "running" and p.last_tick is not None and self.t_ns - p.last_tick > STALL_S * 1e9 \
                    and not self.complete:
                state = "stalled"
            # The same definition as the main loop's IPS: iterations after its first / their time.
            span_s = ((p.last_tick or 0) - p.first_tick) / 1e9 if p.first_tick is not None else 0.0
            procs.append(ProcRow(slot=slot, role=p.role, state=state, iterations=p.iterations,
                                 ips=(p.iterations - p.first_tick_iter) / span_s if span_s > 0 else 0.0,
                                 cpu_percent=p.cpu,
                                 rss_bytes=p.rss, core=p.core, pid=p.pid, error=p.error, node=p.node,
                                 clock_offset_ms=p.clock[0] if p.clock else None,
                                 clock_rtt_ms=p.clock[1] if p.clock else None))
        return Snapshot(
            info=self.info,
            t_s=self.t_ns / 1e9,
            wall_s=wall_ns / 1e9,
            iterations=iterations,
            ips=steady_iterations / (steady_ns / 1e9) if steady_ns > 0 else 0.0,
            ips_now=recent / window_s if window_s > 0 else 0.0,
            ips_history=history,
            startup_s=first_tick / 1e9 if first_tick is not None else None,
            steady_s=steady_ns / 1e9,
            steady_iterations=steady_iterations,
            process_s=process_ns / 1e9,
            exec_s=exec_ns / 1e9,
            shares={k: (v / process_ns if process_ns else 0.0) for k, v in top_ns.items()},
            comm_share=totals.comm_ns / exec_ns if exec_ns else 0.0,
            comm_share_update=totals.comm_update_ns / top_ns["update"] if top_ns["update"] else 0.0,
            comm_s=totals.comm_ns / 1e9,
            update_s=top_ns["update"] / 1e9,
            phases=phases,
            iteration_ms={"p50": float(lat_q[0]), "p95": float(lat_q[1]), "p99": float(lat_q[2])},
            cores_mean=[float(s / n) if n else 0.0 for s, n in zip(self.core_sum, self.core_n, strict=True)],
            cores_now=[float(v) for v in self.core_now],
            procs=procs,
            counters=dict(self.counters),
            returns=list(self.returns),
            complete=self.complete,
            events=list(self.events),
            latency_bound_ms=self.latency_bound_ms,
            bounded_ips=bounded[0],
            bound_met=bounded[1],
            p99_within_bound=(None if self.latency_bound_ms is None
                              else within_latency_bound(float(lat_q[2]), self.latency_bound_ms)),
            stacks={k: dict(v) for k, v in self.stacks.items()},
            warmup=None if self.warmup is None else replace(self.warmup),
            nodes=list(self.nodes.values()),
        )


def summarize(rec: Recording, exact: bool = False) -> Snapshot:
    """Read a whole recording (batch by batch) into one Snapshot: from its aggregates where it has
    them (phase percentiles from histograms, within aggregates.RELATIVE_ERROR of exact; every
    other figure the same as from the spans), or with `exact` from every span (exact phase
    percentiles too; memory then grows by 8 bytes a span)."""
    m = Metrics(rec.info, rec.skipped, exact=exact)
    m.add_all(rec.batches(aggregates=not exact))
    return m.snapshot()


# -- per-iteration figures (diff, confidence intervals) -------------------------------------
@dataclass
class IterationTable:
    """Time per learner iteration after the first, so a figure can be resampled over iterations.

    Every array has one value per complete main-loop iteration after the first (row k-1 =
    iteration k, counted from 0; the first, iteration 0, is start-up and is left out as in the
    Snapshot). A span belongs to the iteration its own process was in when it started (the
    recording's `iter` column); workers and learner count rounds in lockstep, so iteration k of
    every process is summed into one row. Spans of the unfinished iteration after the last tick
    go into the last row, so the rows add up to the Snapshot's totals. Iterations in which a
    phase did not run hold 0.
    """

    iterations: int
    latencies_ns: np.ndarray  # the main loop's iteration latencies
    phases: dict[str, np.ndarray]  # phase name -> ns spent in it, all processes
    top: dict[str, np.ndarray]  # sample/update/sync/other -> top-level span ns
    comm: np.ndarray  # outermost communication spans, ns
    comm_update: np.ndarray  # ... of them inside update

    @property
    def exec(self) -> np.ndarray:
        return self.top["sample"] + self.top["update"]

    @property
    def ips(self) -> float:
        """Iterations / their summed latencies: the Snapshot's IPS, over these rows."""
        seconds = float(self.latencies_ns.sum()) / 1e9
        return self.iterations / seconds if seconds > 0 else 0.0

    def after(self, k: int) -> IterationTable:
        """The table without its first `k` rows."""
        return IterationTable(self.iterations - k, self.latencies_ns[k:], {n: v[k:] for n, v in self.phases.items()},
                              {n: v[k:] for n, v in self.top.items()}, self.comm[k:], self.comm_update[k:])

    @property
    def process(self) -> np.ndarray:
        return sum(self.top.values(), np.zeros(self.iterations))


class IterationAccumulator:
    """Streams span rows into per-(phase, iteration) sums; memory ~ phases x iterations.

    A span's parent matters only as "none" (top level), "communication" or "other" (the rules
    of Metrics._spans), so series are kept per phase and parent class, not per parent."""

    TOP, COMM, OTHER = 0, 1, 2

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._names: dict[tuple[str, int], int] = {}
        self.phase_names = NameBound(MAX_PHASES)  # as Metrics (which counts what is left out)

    @classmethod
    def parent_class(cls, parent: str | None) -> int:
        return cls.TOP if parent is None else (cls.COMM if is_comm(parent) else cls.OTHER)

    def add(self, batch: pa.RecordBatch) -> None:
        """Add the batch's spans, and its span_iter rows (each the summed duration of the spans
        of one phase and parent in one iteration, all processes)."""
        if batch.num_rows == 0:
            return
        kinds, codes = kind_codes(batch)
        for kind in (SPAN, SPAN_ITER):
            if kind in kinds:
                self._add(batch, codes == kinds.index(kind))

    def _add(self, b: pa.RecordBatch, sel: np.ndarray) -> None:
        names, codes, ok = Metrics._phase_codes(b, sel)
        parent = b.column("parent")
        if not pa.types.is_dictionary(parent.type):
            parent = pc.dictionary_encode(parent)
        classes = np.array([self.parent_class(p) for p in parent.dictionary.to_pylist()] + [self.TOP], np.int64)
        pclass = classes[pc.fill_null(parent.indices, len(classes) - 1).to_numpy(zero_copy_only=False)]
        dur, it = b.column("dur_ns"), b.column("iter")
        if dur.null_count:
            ok &= pc.is_valid(dur).to_numpy(zero_copy_only=False)
        it = pc.fill_null(it, -1).to_numpy(zero_copy_only=False)
        ok &= it >= 1  # iteration 0 is start-up (and a span without one is in no iteration)
        if not ok.any():
            return
        present = np.flatnonzero(np.bincount(codes[ok], minlength=len(names)))
        distinct = sorted((names[k] for k in present), key=lambda s: (s is None, s or ""))
        kept = dict(zip(distinct, self.phase_names.admit(distinct), strict=True))
        # Sum per (series, iteration) here, so what is kept is ~ phases x iterations, not spans.
        (code, cls, iters), _, (durs,) = group_rows(
            [codes[ok], pclass[ok], it[ok]], [pc.fill_null(dur, 0).to_numpy(zero_copy_only=False)[ok]])
        pairs = code * 3 + cls
        distinct_pairs, inverse = np.unique(pairs, return_inverse=True)
        keys = np.array([self._names.setdefault((names[k // 3], int(k % 3)), len(self._names))
                         if kept[names[k // 3]] else -1 for k in distinct_pairs.tolist()], np.int64)
        self._parts.append((keys[inverse], iters, durs))

    def table(self, latencies_ns: np.ndarray) -> IterationTable:
        """The table of the iterations after the first, given their latencies (one per row); raises
        BoundExceeded past MAX_DIFF_VALUES values (phase series x iterations)."""
        from marlwatch.validate import MAX_DIFF_VALUES, BoundExceeded

        n = len(latencies_ns)
        if len(self._names) * n > MAX_DIFF_VALUES:
            raise BoundExceeded(f"{len(self._names):,} phase series x {n:,} iterations is more than the "
                                f"{MAX_DIFF_VALUES:,} values a per-iteration table may hold")
        sums = np.zeros((len(self._names), n), np.float64)
        for keys, iters, durs in self._parts:
            ok = (iters >= 1) & (keys >= 0) if n else np.zeros(len(iters), bool)  # iteration 0 is start-up
            rows = np.minimum(iters[ok].astype(np.int64), n) - 1  # after the last tick: the last row
            np.add.at(sums, (keys[ok], rows), durs[ok])
        phases: dict[str, np.ndarray] = {}
        top = {k: np.zeros(n) for k in ("sample", "update", "sync", "other")}
        comm, comm_update = np.zeros(n), np.zeros(n)
        for (name, parent), k in self._names.items():
            if name is None:
                continue
            top_name, in_comm, in_comm_update = counts_in(name, parent == self.TOP, parent == self.COMM)
            if top_name is not None:
                top[top_name] += sums[k]
            if in_comm:
                comm += sums[k]
            if in_comm_update:
                comm_update += sums[k]
            # Row k is used up: the phase's series may be that row itself (no copy of the table),
            # and later rows of the same phase are added into it.
            if name in phases:
                phases[name] += sums[k]
            else:
                phases[name] = sums[k]
        return IterationTable(n, latencies_ns.astype(np.float64), phases, top, comm, comm_update)


def read_iterations(rec: Recording, latency_bound_ms: float | None = None, exact: bool = False,
                    totals: bool = True) -> tuple[Snapshot, IterationTable]:
    """One pass over a recording: its Snapshot and its per-iteration table (the same from the
    aggregates as from the spans; `exact`: from the spans). Without `totals`, a recording's
    aggregates of span totals are not read and the Snapshot's span figures (phases, shares) may
    miss them: for a caller that takes those from the table (diff)."""
    m = Metrics(rec.info, rec.skipped)
    if latency_bound_ms is not None:
        m.latency_bound_ms = latency_bound_ms
    acc = IterationAccumulator()
    for b in rec.batches(aggregates=not exact, iterations=not exact, totals=totals):
        m.add(b)
        acc.add(b)
    return m.snapshot(), acc.table(m.iteration_latencies_ns())


def bounded_throughput(latencies_ns: np.ndarray, wall_s: float, bound_ms: float) -> tuple[float, float]:
    """Latency-bounded IPS (iterations within the bound per second of wall time) and the
    fraction of iterations that met the bound (arXiv 2309.07108 argues for this metric)."""
    if len(latencies_ns) == 0:
        return 0.0, math.nan
    ok = int(np.count_nonzero(latencies_ns <= bound_ms * 1e6))
    return (ok / wall_s if wall_s > 0 else 0.0), ok / len(latencies_ns)


def within_latency_bound(p99_ms: float, bound_ms: float) -> bool:
    """A setting meets a latency bound when its p99 iteration latency (the Snapshot's, after the
    first iteration) is at most the bound; an unknown p99 (no iteration) does not meet it."""
    return not math.isnan(p99_ms) and p99_ms <= bound_ms


@dataclass(frozen=True)
class BoundCandidate:
    """One measured setting of one algorithm and agent count: what the latency-bounded choice reads."""

    algo: str
    agents: int
    setting: tuple[tuple[str, Any], ...]  # what differs between candidates: (("workers", 2), ...)
    ips: float
    p99_ms: float

    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.setting)


@dataclass
class BoundChoice:
    """Latency-bounded throughput of one algorithm and agent count under a bound: the candidate with
    the highest IPS among those whose p99 is within the bound (`best`, None when none is), and for
    every candidate whether it meets the bound and best IPS / its IPS (how far the best is from it)."""

    algo: str
    agents: int
    bound_ms: float
    best: BoundCandidate | None
    rows: list[tuple[BoundCandidate, bool, float | None]]  # (candidate, within the bound, best IPS / its IPS)

    @property
    def lbt(self) -> float:
        """The latency-bounded throughput: the best candidate's IPS, 0 when no candidate meets the bound."""
        return self.best.ips if self.best is not None else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"algo": self.algo, "agents": self.agents, "bound_ms": self.bound_ms, "lbt_ips": self.lbt,
                "best": dict(self.best.setting) if self.best else None,
                "candidates": [{**dict(c.setting), "ips": c.ips, "p99_ms": c.p99_ms, "within_bound": ok,
                                "best_over_this": ratio} for c, ok, ratio in self.rows]}


def latency_bounded_choice(candidates: Iterable[BoundCandidate], bound_ms: float) -> list[BoundChoice]:
    """Per (algorithm, agents), the setting with the highest IPS whose p99 iteration latency is within
    `bound_ms` (ties: the first in setting order, i.e. fewer workers). Sorted by algorithm and agents."""
    groups: dict[tuple[str, int], list[BoundCandidate]] = {}
    for c in candidates:
        groups.setdefault((c.algo, c.agents), []).append(c)
    out = []
    for (algo, agents), cands in sorted(groups.items()):
        cands.sort(key=lambda c: c.setting)
        ok = [c for c in cands if within_latency_bound(c.p99_ms, bound_ms)]
        best = max(ok, key=lambda c: c.ips, default=None)  # max keeps the first of equal IPS
        rows = [(c, within_latency_bound(c.p99_ms, bound_ms),
                 best.ips / c.ips if best is not None and c.ips > 0 else None) for c in cands]
        out.append(BoundChoice(algo, agents, bound_ms, best, rows))
    return out

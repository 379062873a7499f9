"""Auto phases: where the time goes in code that was never instrumented.

`install(span_api)` (also `marlwatch.auto_phases()`, and the start-up hook of `marlwatch run -- COMMAND`)
hooks whichever of these libraries the program uses, each only when the program imports it (an
import hook: installing costs nothing at start-up and makes none of them a dependency):

- `sample/env_step`: steps of Gymnasium `Env` (wrappers included) and `VectorEnv`, PettingZoo
  `AECEnv` and `ParallelEnv`, TorchRL `EnvBase`, Stable-Baselines3 `VecEnv`. Every class's own
  `step` is wrapped, including classes defined later (`__init_subclass__` on each base); only the
  outermost step is a span: a wrapper calling the env it wraps does not nest env_step in env_step.
- `update/backward`: `torch.autograd.backward` (which `Tensor.backward` calls).
- `update/optimizer`: torch's global optimizer step hooks
  (`torch.optim.optimizer.register_optimizer_step_pre_hook`/`_post_hook`), every optimizer.
- `sync/comm/<op>`: torch.distributed collectives and point-to-point calls (the call; an
  `async_op=True` call returns before the communication ends).
- Ray workers: no phase, but what a task or actor method recorded is shipped when it returns
  (Ray ends its workers without atexit; see `_ray_tasks`).

Iterations, for a program that never calls `marlwatch.tick()`: one iteration is one
sample-then-update cycle. An iteration ends when an outermost `sample/env_step` begins after an
`update/backward` or `update/optimizer` ended since the last iteration ended (and, at exit, if
one ended since). Once the program calls `tick()` itself, only its own ticks count. docs/metrics.md
defines it for the figures.

Spans from the hooks are ordinary spans: they nest in the program's own spans and its spans in
them, per thread. A hook costs a Python call and a span when it records (bench/autophase_cost.py).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import FunctionType, ModuleType
from typing import Any

ENV_STEP = "sample/env_step"
BACKWARD = "update/backward"
OPTIMIZER = "update/optimizer"
_MARK = "__marlwatch_phase__"  # on a wrapper: the phase it records

_installed = False
_install_lock = threading.Lock()


def installed() -> bool:
    """Whether the auto phases are installed in this process."""
    return _installed


def _inst() -> ModuleType:
    global _instrument
    if _instrument is None:
        assert _span_api is not None, "install() first"
        _instrument = _span_api()
    return _instrument


# The span API (marlwatch.instrument) the hooks record through, got from what install() was given
# on first use: installing the hooks at start-up does not import it (nor does this module).
_span_api: Callable[[], ModuleType] | None = None
_instrument: ModuleType | None = None


# -- wrappers ----------------------------------------------------------------------------------
def _sample_wrapper(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    inst = _inst()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tel = inst._telemetry
        sp = tel.span(name)
        if sp.innermost:  # a wrapper's step calling the wrapped env's: one span, the outer one
            return fn(*args, **kwargs)
        if tel._armed:
            tel._auto_tick()
        with sp:
            return fn(*args, **kwargs)

    setattr(wrapper, _MARK, name)
    return wrapper


def _update_wrapper(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    inst = _inst()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tel = inst._telemetry
        sp = tel.span(name)
        if sp.innermost:
            return fn(*args, **kwargs)
        with sp:
            out = fn(*args, **kwargs)
        tel._armed = True
        return out

    setattr(wrapper, _MARK, name)
    return wrapper


def _comm_wrapper(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    inst = _inst()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with inst._telemetry.span(name):
            return fn(*args, **kwargs)

    setattr(wrapper, _MARK, name)
    return wrapper


def _wrap_own_step(cls: type, make: Callable[[Callable[..., Any], str], Callable[..., Any]], name: str) -> None:
    """Wrap `cls.step` if `cls` defines it itself as a plain function."""
    fn = cls.__dict__.get("step")
    if isinstance(fn, FunctionType) and not hasattr(fn, _MARK):
        try:
            cls.step = make(fn, name)  # type: ignore[attr-defined]
        except (TypeError, AttributeError):
            pass  # a class that cannot be changed (built in C): its steps go unrecorded


def hook_steps(base: type, name: str = ENV_STEP) -> None:
    """Record every `step` of `base` and of its subclasses, those that exist and those defined
    later, as the phase `name` (outermost only)."""
    if base.__dict__.get("__marlwatch_hooked__"):
        return
    todo = [base]
    while todo:
        cls = todo.pop()
        _wrap_own_step(cls, _sample_wrapper, name)
        todo.extend(cls.__subclasses__())
    own = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: type, **kwargs: Any) -> None:
        if own is not None:
            own.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        _wrap_own_step(cls, _sample_wrapper, name)

    base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
    base.__marlwatch_hooked__ = True  # type: ignore[attr-defined]


# -- one section per library: each runs when its module has been imported --------------------------
def _gymnasium_core(module: ModuleType) -> None:
    hook_steps(module.Env)


def _gymnasium_vector(module: ModuleType) -> None:
    hook_steps(module.VectorEnv)


def _pettingzoo_env(module: ModuleType) -> None:
    hook_steps(module.AECEnv)
    hook_steps(module.ParallelEnv)


def _torchrl_envs(module: ModuleType) -> None:
    hook_steps(module.EnvBase)


def _sb3_vec_env(module: ModuleType) -> None:
    hook_steps(module.VecEnv)


_COMM_OPS = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "all_gather_object", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list",
    "recv_object_list",
)


def _torch(module: ModuleType) -> None:
    import torch.autograd
    import torch.optim.optimizer as optim

    if not hasattr(torch.autograd.backward, _MARK):
        torch.autograd.backward = _update_wrapper(torch.autograd.backward, BACKWARD)
    optim.register_optimizer_step_pre_hook(_optimizer_pre)
    optim.register_optimizer_step_post_hook(_optimizer_post)
    dist = getattr(module, "distributed", None)
    if dist is not None and dist.is_available():
        c10d = sys.modules.get("torch.distributed.distributed_c10d")
        for op in _COMM_OPS:
            fn = getattr(dist, op, None)
            if fn is None or hasattr(fn, _MARK):
                continue
            wrapped = _comm_wrapper(fn, f"sync/comm/{op}")
            setattr(dist, op, wrapped)
            if c10d is not None and getattr(c10d, op, None) is fn:
                setattr(c10d, op, wrapped)


# The optimizer's pre and post hooks are two calls, not one `with`: if a step raises, the post
# hook never runs and its span stays open. The optimizer that opened it is remembered per thread:
# its next step drops the leftover frame (Span.abandon), and a span ending around it pops past it.
_optimizer_state = threading.local()


def _optimizer_pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    owner = getattr(_optimizer_state, "owner", None)
    if owner is not None and owner is not optimizer:
        return  # a step inside another optimizer's step: one span, the outer one
    sp = (_instrument or _inst())._telemetry.span(OPTIMIZER)
    if owner is optimizer:
        sp.abandon()  # its last step raised
    _optimizer_state.owner = optimizer
    sp.__enter__()


def _optimizer_post(optimizer: Any, args: Any, kwargs: Any) -> None:
    if getattr(_optimizer_state, "owner", None) is not optimizer:
        return
    _optimizer_state.owner = None
    tel = (_instrument or _inst())._telemetry
    try:
        tel.span(OPTIMIZER).__exit__(None, None, None)
    except RuntimeError:
        pass  # spans were switched on between the two hooks: nothing was opened
    tel._armed = True


def _ray_tasks(module: ModuleType) -> None:
    """In a Ray worker, ship what each task (or actor method) recorded when it returns.

    Not a phase, a delivery: Ray ends its workers itself (at `ray.shutdown()` the core worker
    exits the process without running atexit), and a task is a call with nothing after it until
    the next one, so whatever the last call recorded after the last shipment (up to
    `flush_interval_s`, the whole of a short run) would never reach the monitor. Ray looks up what
    to run for a task with `FunctionActorManager.get_execution_info` (once per function: it caches
    the answer), hence this patch at import, before any task runs. Costs one flush per task.
    """
    manager = module.FunctionActorManager
    lookup = manager.get_execution_info
    if getattr(lookup, _MARK, None):
        return

    def flushing(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def task(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                tel = _inst()._telemetry
                if tel.sink is not None:
                    tel.flush()

        return task

    @functools.wraps(lookup)
    def get_execution_info(self: Any, *args: Any, **kwargs: Any) -> Any:
        info = lookup(self, *args, **kwargs)
        return info._replace(function=flushing(info.function))

    setattr(get_execution_info, _MARK, "ray task")
    manager.get_execution_info = get_execution_info


# Module that defines the hooked classes -> its section.
SECTIONS: dict[str, Callable[[ModuleType], None]] = {
    "gymnasium.core": _gymnasium_core,
    "gymnasium.vector.vector_env": _gymnasium_vector,
    "pettingzoo.utils.env": _pettingzoo_env,
    "torchrl.envs.common": _torchrl_envs,
    "stable_baselines3.common.vec_env.base_vec_env": _sb3_vec_env,
    "torch": _torch,
    "ray._private.function_manager": _ray_tasks,
}


def _run(section: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        section(module)
    except Exception as e:  # noqa: BLE001 - a library version we do not know: skip it, say so once
        sys.stderr.write(f"marlwatch: warning: auto phases for {module.__name__} not installed: "
                         f"{type(e).__name__}: {e}\n")


# -- the import hook ---------------------------------------------------------------------------
class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the section for the module it loaded."""

    def __init__(self, loader: importlib.abc.Loader, section: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.section = section

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _run(self.section, module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path; for the modules in SECTIONS only, asks the other finders for the
    module and wraps its loader. Every other import passes through at the cost of a dict look-up."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        section = SECTIONS.get(fullname)
        if section is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, section)
                return spec
        return None


def install(span_api: Callable[[], ModuleType]) -> None:
    """Install the auto phases in this process (once; later calls do nothing). `span_api` returns
    marlwatch.instrument, the first time a hook records (so that installing costs no import)."""
    global _installed, _span_api
    with _install_lock:
        if _installed:
            return
        _installed = True
        _span_api = span_api
        sys.meta_path.insert(0, _Finder())
        for name, section in SECTIONS.items():
            module = sys.modules.get(name)
            if module is not None:
                _run(section, module)


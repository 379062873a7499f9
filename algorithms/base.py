"""The contract between marlwatch's runner and an algorithm.

An algorithm is two objects. A `Rollout` lives in each worker process: it holds an env and a
copy of the policy and turns the latest weights into a payload of experience. A `Learner`
lives in the learner process: it turns the workers' payloads into updated weights. The runner
alternates them: broadcast weights (`sync/`), every worker collects (`sample/`), the learner
gathers (`sync/`) and updates (`update/`), then ticks one iteration. Payloads and weights are
plain dicts of numpy arrays, so they cross a pipe today and a Ray object store later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# Every setting and the values it takes live in algorithms.configs (no torch there); an algorithm's
# config subclasses BaseConfig from here or from there.
from algorithms.configs import BaseConfig, setting  # noqa: F401 - re-exported

Payload = dict[str, Any]
Weights = dict[str, Any]


class Rollout(Protocol):
    def __init__(self, cfg: Any, worker_index: int) -> None: ...

    def load_weights(self, weights: Weights) -> None: ...

    def collect(self) -> Payload: ...


class Learner(Protocol):
    def __init__(self, cfg: Any) -> None: ...

    def weights(self) -> Weights: ...

    def update(self, payloads: list[Payload]) -> dict[str, float]: ...


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's place in the taxonomy and where its code lives (imported on first use,
    so listing algorithms does not import torch)."""

    name: str
    training: str  # "CTDE" or "decentralised"
    communication: str  # "none", "pre-defined graph", "learned"
    description: str  # what its communication is
    default_env: str
    module: str
    config: str
    rollout: str
    learner: str
    config_module: str = ""
    """Where `config` lives, if not in `module`: a module that does not import torch keeps the
    monitor, which only builds and checks the config, light (the built-ins use algorithms.configs)."""

    def _load(self, attr: str, module: str = "") -> type:
        import importlib

        return getattr(importlib.import_module(module or self.module), attr)

    @property
    def config_cls(self) -> type:
        return self._load(self.config, self.config_module)

    @property
    def rollout_cls(self) -> type:
        return self._load(self.rollout)

    @property
    def learner_cls(self) -> type:
        return self._load(self.learner)

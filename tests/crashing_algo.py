"""A MADDPG whose worker 1 raises at a chosen round: lets tests see a real worker crash."""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import AlgorithmSpec
from algorithms.configs import MADDPGConfig
from algorithms.maddpg import MADDPGLearner, MADDPGRollout


@dataclass
class CrashConfig(MADDPGConfig):
    crash_at: int = 3


class CrashingRollout(MADDPGRollout):
    def __init__(self, cfg: CrashConfig, worker_index: int) -> None:
        super().__init__(cfg, worker_index)
        self.worker_index = worker_index
        self.rounds = 0

    def collect(self):
        self.rounds += 1
        if self.rounds == self.cfg.crash_at and self.worker_index == 0:
            raise RuntimeError("injected failure in collect")
        return super().collect()


SPEC = AlgorithmSpec(
    name="crashing", training="CTDE", communication="none", description="test only",
    default_env="simple_spread", module="tests.crashing_algo", config="CrashConfig",
    rollout="CrashingRollout", learner="MADDPGLearner",
)
__all__ = ["SPEC", "CrashingRollout", "CrashConfig", "MADDPGLearner"]

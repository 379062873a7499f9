"""marlwatch's built-in MARL algorithms, by name, with their place in the taxonomy.

Taxonomy (Wiggins et al. 2023): training scheme (CTDE or decentralised) x communication
(none, a pre-defined graph, or learned online).
"""

from __future__ import annotations

from typing import Any

from algorithms.base import AlgorithmSpec, BaseConfig

CONFIGS = "algorithms.configs"

ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in [
        AlgorithmSpec(
            name="maddpg", training="CTDE", communication="none (implicit)",
            description="centralised critics read every agent's observation and target action (N^2 actor passes)",
            default_env="simple_spread", module="algorithms.maddpg",
            config="MADDPGConfig", rollout="MADDPGRollout", learner="MADDPGLearner", config_module=CONFIGS,
        ),
        AlgorithmSpec(
            name="independent", training="decentralised", communication="none",
            description="independent DDPG learners: each critic sees only its own agent (the baseline)",
            default_env="simple_spread", module="algorithms.maddpg",
            config="IndependentConfig", rollout="MADDPGRollout", learner="MADDPGLearner", config_module=CONFIGS,
        ),
        AlgorithmSpec(
            name="neurcomm", training="decentralised", communication="pre-defined graph",
            description="neighbours' observations, policy fingerprints and LSTM states along a fixed graph",
            default_env="cacc", module="algorithms.neurcomm",
            config="NeurCommConfig", rollout="NeurCommRollout", learner="NeurCommLearner", config_module=CONFIGS,
        ),
        AlgorithmSpec(
            name="tom2c", training="CTDE", communication="learned",
            description="theory-of-mind over N x N pairs + Gumbel graph choosing whom to message; attention critic",
            default_env="simple_spread", module="algorithms.tom2c",
            config="ToM2CConfig", rollout="ToM2CRollout", learner="ToM2CLearner", config_module=CONFIGS,
        ),
        AlgorithmSpec(
            name="tarmac", training="decentralised", communication="learned",
            description="per-agent learners; targeted attention messages (signature, value) read by query",
            default_env="simple_spread", module="algorithms.tarmac",
            config="TarMACConfig", rollout="TarMACRollout", learner="TarMACLearner", config_module=CONFIGS,
        ),
    ]
}


class UnknownAlgorithm(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_algorithm(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise UnknownAlgorithm(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return ALGORITHMS[name]


def make_config(name: str | AlgorithmSpec, *, env: str = "", agents: int = 3, workers: int = 1, seed: int = 0,
                settings: dict[str, str] | None = None) -> Any:
    spec = name if isinstance(name, AlgorithmSpec) else get_algorithm(name)
    cfg: BaseConfig = spec.config_cls()
    cfg.env = env or spec.default_env
    cfg.agents, cfg.workers, cfg.seed = agents, workers, seed
    cfg.override(settings or {})
    from algorithms.envs import ENVS

    if cfg.env not in ENVS:
        raise KeyError(f"unknown env {cfg.env!r} (known: {', '.join(sorted(ENVS))})")
    cfg.check()  # every value within its rule, then the algorithm's own checks: ValueError, one line
    return cfg

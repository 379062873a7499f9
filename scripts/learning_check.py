"""Does each built-in algorithm learn? Train it for a few minutes and compare episode returns.

For every algorithm (default: all registered), this runs a real headless training run
(learner + workers, recorded like any `marlwatch run`) for `--minutes`, then reads the
recording's `episode_return` gauges through `marlwatch.metrics.Metrics` and prints the mean
team return of a uniformly random policy on the same env, of the first 10% of training
episodes and of the last 10%. Not a CI test: it takes minutes per algorithm.

    python scripts/learning_check.py --algos neurcomm,maddpg --minutes 3
    python scripts/learning_check.py --algos neurcomm --set neurcomm:lr=5e-4 --agents 8
    python scripts/learning_check.py --algos maddpg --agents 3 --iterations 600

`--iterations K` trains for K learner iterations instead of a time: the same amount of training
whatever else the machine is doing (a time limit on a shared machine buys fewer updates).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from algorithms import ALGORITHMS, make_config  # noqa: E402
from algorithms.common import ParallelEnvRunner  # noqa: E402
from algorithms.envs import make_env  # noqa: E402
from marlwatch.cli import RunFailed, UsageError  # noqa: E402
from marlwatch.cli.run import build_run, start_run  # noqa: E402
from marlwatch.metrics import Metrics, summarize  # noqa: E402
from marlwatch.outputs import write_text  # noqa: E402
from marlwatch.recording import open_recording  # noqa: E402
from marlwatch.runner import RunConfig, drive  # noqa: E402


def random_returns(env_name: str, agents: int, max_cycles: int, episodes: int, seed: int) -> list[float]:
    """Team returns of a uniformly random policy, counted exactly as training counts them
    (ParallelEnvRunner sums every agent's reward over an episode)."""
    runner = ParallelEnvRunner(make_env(env_name, agents, max_cycles), seed=seed)
    rng = np.random.default_rng(seed)
    while len(runner.returns) < episodes:
        runner.step(rng.integers(0, runner.n_actions, size=runner.n))
    return runner.returns[:episodes]


def training_returns(path: Path) -> list[float]:
    """Every episode return a recording holds, in the order the monitor received them."""
    metrics = Metrics(open_recording(path).info)
    metrics.returns = deque()  # keep all of them, not only the recent ones the live view shows
    rec = open_recording(path)
    metrics.add_all(rec.batches())
    return list(metrics.returns)


def check(algo: str, args: argparse.Namespace, settings: dict[str, str]) -> dict:
    cfg = make_config(algo, agents=args.agents, workers=args.workers, seed=args.seed, settings=settings)
    record = Path(args.out) / f"{algo}.arrow"
    run = build_run(RunConfig(algo=algo, agents=args.agents, workers=args.workers, iterations=args.iterations,
                              seed=args.seed, record=str(record), overwrite=args.force, settings=settings))
    budget = f"{args.iterations} iterations" if args.iterations else f"{args.minutes:g} min"
    print(f"learning check: {algo} on {cfg.env}, {args.agents} agents, {args.workers} worker(s), "
          f"{budget} -> {record}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    start_run(run)
    drive(run, time_limit_s=None if args.iterations else args.minutes * 60)
    minutes = (time.monotonic() - t0) / 60
    if run.failure:
        raise RuntimeError(f"{algo}: run failed: {run.failure}")
    returns = training_returns(record)
    rand = random_returns(cfg.env, args.agents, getattr(cfg, "max_cycles", 25), args.random_episodes, args.seed)
    tenth = max(1, len(returns) // 10)
    first, last = returns[:tenth], returns[-tenth:]
    return {
        "algo": algo, "env": cfg.env, "agents": args.agents, "workers": args.workers, "minutes": round(minutes, 1),
        "iterations": summarize(open_recording(record)).iterations,
        "episodes": len(returns), "random": float(np.mean(rand)), "random_std": float(np.std(rand)),
        "first_10pct": float(np.mean(first)) if first else float("nan"),
        "last_10pct": float(np.mean(last)) if last else float("nan"),
        "last_10pct_std": float(np.std(last)) if last else float("nan"),
        "settings": settings, "recording": str(record),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default=",".join(ALGORITHMS), help="comma-separated (default: every registered one)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time per algorithm")
    p.add_argument("--iterations", type=int, default=None,
                   help="train for this many learner iterations instead of --minutes")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-episodes", type=int, default=200)
    p.add_argument("--out", default="runs/learning-check", help="folder for the recordings and results.json")
    p.add_argument("--force", action="store_true", help="overwrite the recordings of an earlier check in --out")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="[ALGO:]KEY=VALUE",
                   help="setting for every algorithm, or only ALGO's with the prefix")
    args = p.parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown or args.minutes <= 0 or args.agents < 1 or args.workers < 1 or (args.iterations or 1) < 1:
        print(f"learning_check: bad arguments (unknown algorithms: {unknown or 'none'}; minutes, agents and "
              "workers and iterations must be positive)", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for algo in algos:
        settings = {}
        for s in args.settings:
            scope, _, kv = s.partition(":") if ":" in s.split("=", 1)[0] else ("", "", s)
            if scope in ("", algo):
                k, _, v = kv.partition("=")
                settings[k.strip()] = v.strip()
        try:
            results.append(check(algo, args, settings))
        except (UsageError, RunFailed, RuntimeError) as e:
            print(f"learning_check: {e}", file=sys.stderr)
            return 1
        r = results[-1]
        print(f"  {algo}: {r['episodes']} episodes; random {r['random']:.1f}, first 10% {r['first_10pct']:.1f}, "
              f"last 10% {r['last_10pct']:.1f}", file=sys.stderr, flush=True)
    header = ("| algorithm | env | agents | minutes | iterations | episodes | random policy | first 10% | last 10% |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    for r in results:
        print(f"| {r['algo']} | {r['env']} | {r['agents']} | {r['minutes']:g} | {r['iterations']} | {r['episodes']} "
              f"| {r['random']:.1f} | {r['first_10pct']:.1f} | {r['last_10pct']:.1f} ± {r['last_10pct_std']:.1f} |")
    write_text(Path(args.out) / "results.json", json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

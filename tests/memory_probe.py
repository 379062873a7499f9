"""Run in a subprocess by tests/test_limits.py: how much memory a real learner takes for one
config (its buffer filled, two updates), next to the config's Footprint estimate.

    python tests/memory_probe.py ALGO AGENTS WORKERS '{"setting": "value"}'  -> one JSON line

Two measurements: `live` is the peak of the bytes the learner itself holds (torch's own count of
tensor allocations, from its profiler, plus the replay buffer's arrays), the same on any machine;
`rss` is what the process took from the system, which also holds what the allocator and the BLAS
kernels keep, and differs between machines (200 MB here, 500 MB on a CI machine, for one config).
"""

from __future__ import annotations

import gc
import json
import resource
import sys

import psutil
import torch
from torch.profiler import ProfilerActivity, profile

from algorithms import get_algorithm, make_config
from algorithms.envs import env_sizes, make_env

torch.set_num_threads(1)
algo, agents, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
settings = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
spec = get_algorithm(algo)
cfg = make_config(spec, agents=agents, workers=workers, settings=settings)
make_env(cfg.env, agents, cfg.max_cycles)  # env code imported and built once, as in the learner
rollouts = [spec.rollout_cls(cfg, i) for i in range(workers)]
payloads = [r.collect() for r in rollouts]
gc.collect()
base = psutil.Process().memory_info().rss
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    learner = spec.learner_cls(cfg)
    buf = getattr(learner, "buffer", None)
    if buf is not None:  # a long run fills it: touch every page
        for arr in buf.data.values():
            arr.fill(0)
        buf.size = buf.capacity
    for _ in range(2):
        learner.update(payloads)
held = tensor_peak = 0
for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
    held += event.nbytes()  # negative when freed
    tensor_peak = max(tensor_peak, held)
buffer_bytes = sum(arr.nbytes for arr in buf.data.values()) if buf is not None else 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
now = psutil.Process().memory_info().rss
obs, acts = env_sizes(cfg.env, agents)
fp = cfg.footprint(obs, acts, None)
print(json.dumps({"live": tensor_peak + buffer_bytes, "rss": max(peak, now) - base, "estimate": fp.learner}))

"""Where a step of the batched env spends its time on the GPU: cProfile of one pass over N held-out rows
(after one unmeasured pass). Usage: python prof_vec.py N MODEL"""
import cProfile
import pstats
import sys
import time

import gymnasium as gym
import numpy as np
import torch

import envs

n, model = int(sys.argv[1]), sys.argv[2]
vec = gym.make_vec(envs.ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", model=model, split="eval")
actions = np.full(n, list(vec.envs[0].bits).index(4))
rows = [item.row for item in vec.envs[0].items[:n]]


def one_pass() -> int:
    vec.reset(options={"rows": rows})
    steps = 0
    while not vec.idle.all():
        vec.step(actions)
        steps += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return steps


for label, profiler in (("warm-up", None), ("measured", cProfile.Profile())):
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    steps = one_pass()
    if profiler:
        profiler.disable()
    print(label, "steps", steps, "episodes", n, "wall", round(time.perf_counter() - t0, 2))
stats = pstats.Stats(profiler)
stats.sort_stats("cumulative").print_stats(r"/main/(envs|quant|agents)", 40)
stats.sort_stats("tottime").print_stats(15)

"""Which phase of the batched env's step issues its torch operators, per row-step (one step, or reset, of
one row), counted on any device: on a GPU each operator is at least one kernel launch, which is what bounds
the batched env there (`prof_vec.py`). One pass over N held-out rows after one uncounted pass; each
operator is charged to the innermost phase that is running.

    python results/gpu_h200/ops_by_phase.py N MODEL BATCH_SCORING [EPISODES_PER_ROW]   # e.g. 8 embedded 1

EPISODES_PER_ROW (default 1): the pass runs that many episodes per row, each row taking the next held-out
item when its episode ends (autoreset), so with more than one the rows stay busy as in training, and the
model's operators are shared by every row in most steps.
"""

import functools
import sys
from collections import Counter

import gymnasium as gym
import numpy as np

import envs
import envs.features as features
import envs.kv_precision as kv_precision
import envs.vector as vector
from experiments.bench_throughput import TorchOpCounter
from quant import batched_cache, kv_cache

PHASES = [
    (vector.KVPrecisionVectorEnv, "_run_blocks", "block forward (model, masks, contexts)"),
    (batched_cache._BatchedLayer, "update", "  batched cache: pad each row's keys/values"),
    (kv_cache.MixedPrecisionLayer, "update", "  each row's layer: append the block"),
    (vector.KVPrecisionVectorEnv, "_commit_blocks", "commit (quantize, store, keep floats)"),
    (kv_cache.MixedPrecisionKVCache, "commit", "commit (quantize, store, keep floats)"),
    (features.FeatureSet, "observe", "features"),
    (vector.KVPrecisionVectorEnv, "_score_endings", "scoring the endings"),
    (kv_precision.KVPrecisionEnv, "_finish_step", "reward, observation, info"),
    (kv_precision.KVPrecisionEnv, "_start_episode", "starting an episode"),
]


class PhaseOpCounter(TorchOpCounter):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.by_phase: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_phase[self.stack[-1] if self.stack else "other"] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def charge(self, cls, name: str, label: str) -> None:
        method = getattr(cls, name)

        @functools.wraps(method)
        def charged(*args, **kwargs):
            self.stack.append(label)
            try:
                return method(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(cls, name, charged)


n, model, batch_scoring = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
per_row = int(sys.argv[4]) if len(sys.argv) > 4 else 1
vec = gym.make_vec(envs.ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", model=model, split="eval",
                   batch_scoring=batch_scoring)
actions = np.full(n, list(vec.envs[0].bits).index(4))
rows = [item.row for item in vec.envs[0].items[: n * per_row]]


def one_pass() -> int:
    """Every row's episode once, all starting together; the number of row-steps."""
    vec.reset(options={"rows": rows})
    row_steps = n
    while not vec.idle.all():
        row_steps += int(np.sum(~vec.idle))
        vec.step(actions)
    return row_steps


one_pass()  # references, first-call costs
counter = PhaseOpCounter()
for cls, name, label in PHASES:
    counter.charge(cls, name, label)
with counter:
    row_steps = one_pass()
print(f"N={n} {model} batch_scoring={batch_scoring}, {len(rows)} episodes: {counter.ops / row_steps:.0f} torch ops "
      f"per row-step, {counter.ops / len(rows):.0f} per episode ({row_steps / len(rows):.1f} row-steps each)")
for label, ops in counter.by_phase.most_common():
    print(f"  {label:<44} {ops / row_steps:7.0f}")

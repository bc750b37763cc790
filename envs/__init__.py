"""The Gymnasium side of kvgym. Importing it registers ``kvgym/KVPrecision-v0``.

It also makes a forked child process run torch on one thread. torch's CPU ops run on an OpenMP
thread pool, and a child forked after the parent has used that pool hangs forever on its first
parallel op (GNU OpenMP is not fork-safe): ``gym.make_vec(ENV_ID, vectorization_mode="async")``
forks its workers, so after an in-process evaluation it hung without an error. One thread per
forked worker is also what N worker processes on N cores want. ``vector_kwargs={"context":
"spawn"}`` starts fresh interpreters instead (slower to start, keeps torch's default threads).
"""

import os
import sys

import gymnasium as gym

ENV_ID = "kvgym/KVPrecision-v0"

if ENV_ID not in gym.registry:
    gym.register(
        id=ENV_ID,
        entry_point="envs.kv_precision:KVPrecisionEnv",
        # gym.make_vec(ENV_ID, num_envs=N, vectorization_mode="vector_entry_point"): N episodes per forward
        vector_entry_point="envs.vector:KVPrecisionVectorEnv",
        nondeterministic=False,
    )


def _one_torch_thread_after_fork() -> None:
    """Runs in every forked child; a process that has not imported torch has no pool to fear."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows never forks
    os.register_at_fork(after_in_child=_one_torch_thread_after_fork)

__all__ = ["ENV_ID"]

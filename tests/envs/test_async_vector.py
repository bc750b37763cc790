"""Gymnasium's AsyncVectorEnv after the parent process has run the model (fork after torch's pool).

Run in a subprocess under a timeout: the failure this guards against is a silent hang, which must
fail the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import gymnasium as gym
import torch
import envs

torch.set_num_threads(2)  # a pool of more than one thread in the parent: what the fork used to inherit
kw = dict(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="eval")
env = gym.make(envs.ENV_ID, **kw)
env.reset(options={"row": env.unwrapped.items[0].row})
done = False
while not done:  # the parent runs the model first, as an in-process evaluation would
    _, _, terminated, truncated, _ = env.step(0)
    done = terminated or truncated
env.close()
vec = gym.make_vec(envs.ENV_ID, num_envs=2, vectorization_mode="async", **kw)
obs, _ = vec.reset(seed=0)
obs, reward, terminated, truncated, info = vec.step([0, 0])
assert obs.shape[0] == 2, obs.shape
vec.close()
print("ASYNC-OK")
"""


def test_async_vector_env_runs_after_the_parent_ran_the_model():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)  # ~5 s when it works; a hang never returns
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the forked workers too
        out, _ = proc.communicate()
        raise AssertionError(f"make_vec(..., vectorization_mode='async') hung after the parent ran the model:\n{out[-2000:]}") from None
    assert proc.returncode == 0 and "ASYNC-OK" in out, out[-2000:]

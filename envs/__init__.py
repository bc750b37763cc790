"""The Gymnasium side of kvgym. Importing it registers ``kvgym/KVPrecision-v0``."""

import gymnasium as gym

ENV_ID = "kvgym/KVPrecision-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.kv_precision:KVPrecisionEnv", nondeterministic=False)

__all__ = ["ENV_ID"]

"""KV-precision policies; every one answers SB3's ``predict(obs, state, episode_start, deterministic)``.

The torch- and SB3-backed policies are imported on first use so ``import agents`` stays cheap.
"""

from agents.base import Policy
from agents.fixed import FixedBitsPolicy
from agents.registry import POLICIES, canonical_name, make_policy, register_policy
from agents.rule import EntropyRulePolicy, calibrate_thresholds

_LAZY = {
    "MLPPolicy": "agents.mlp",
    "train_controller": "agents.mlp",
    "CompositeLoss": "agents.mlp",
    "SB3Policy": "agents.sb3",
    "SB3VecEnv": "agents.sb3_vec",
}

__all__ = [
    "POLICIES",
    "EntropyRulePolicy",
    "FixedBitsPolicy",
    "Policy",
    "calibrate_thresholds",
    "canonical_name",
    "make_policy",
    "register_policy",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")

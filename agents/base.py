"""The one interface every KV-precision policy answers.

Policies mimic a stable-baselines3 model (``predict(obs, state, episode_start, deterministic)``) so that
evaluation code runs a hand-made rule, a supervised MLP and a PPO agent through the same loop.
They are built from the env's ``observation_names`` and ``bits`` rather than from a positional layout,
so a feature is read by name and a policy built for one observation layout fails loudly on another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np


class Policy(ABC):
    """Maps observations (flat float vectors named by ``observation_names``) to indices into ``bits``."""

    #: The policy's canonical name, the same in its spec, records, references, reports and wandb
    #: ("fixed:4", "fp16", "rule", "mlp", "ppo"); ``agents.registry.make_policy`` sets it from the spec.
    name: str = "policy"

    def __init__(self, observation_names: Sequence[str], bits: Sequence[int]):
        names = tuple(str(n) for n in observation_names)
        if not names:
            raise ValueError("observation_names is empty; pass env.unwrapped.observation_names")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"observation_names has duplicates: {dupes}")
        widths = tuple(int(b) for b in bits)
        if not widths or len(set(widths)) != len(widths) or min(widths) <= 0:
            raise ValueError(f"bits must be distinct positive integers, got {tuple(bits)!r}")
        self.observation_names: tuple[str, ...] = names
        self.bits: tuple[int, ...] = widths

    # ----------------------------------------------------------------------------------------- helpers
    def column(self, name: str) -> int:
        """Index of feature ``name`` in the observation vector."""
        try:
            return self.observation_names.index(name)
        except ValueError:
            raise ValueError(
                f"{type(self).__name__} needs observation {name!r}, but the env provides "
                f"{list(self.observation_names)}; add it to the env's features or configure the policy "
                "to use one of these"
            ) from None

    def bits_to_action(self, bits_values: Any) -> np.ndarray:
        """Action indices for requested bit-widths.

        Each request maps to the *smallest available width at or above it* (e.g. 3 -> 4, 4 -> 4), so a
        policy that asks for some precision never gets less than it asked for; a request above every
        available width gets the largest one. Returns an int64 array shaped like ``bits_values``.
        """
        req = np.asarray(bits_values, dtype=np.float64)
        widths = np.asarray(self.bits, dtype=np.float64)
        order = np.argsort(widths)  # env bits need not be sorted; search the sorted view
        pos = np.searchsorted(widths[order], req, side="left")
        pos = np.minimum(pos, len(widths) - 1)
        return order[pos].astype(np.int64)

    # ----------------------------------------------------------------------------------- the interface
    @abstractmethod
    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Actions (1-D int64, indices into ``bits``) for a 2-D batch of observations."""

    def predict(
        self,
        obs: Any,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, Any]:
        """SB3-compatible: a 1-D ``obs`` gives a 0-d action array, a 2-D batch a 1-D one; ``state`` passes through."""
        arr = np.asarray(obs, dtype=np.float32)
        if arr.ndim not in (1, 2):
            raise ValueError(f"obs must be 1-D (one observation) or 2-D (a batch), got shape {arr.shape}")
        if arr.shape[-1] != len(self.observation_names):
            raise ValueError(
                f"obs has {arr.shape[-1]} features but this policy was built for "
                f"{len(self.observation_names)} ({list(self.observation_names)}); build it with the env's "
                "observation_names"
            )
        single = arr.ndim == 1
        actions = np.asarray(self.act(arr[None, :] if single else arr, deterministic=deterministic))
        actions = actions.astype(np.int64).reshape(-1)
        return (actions[0] if single else actions), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bits={self.bits})"

"""A training wrapper that pays an episode's return minus what a reference policy earns on the same episode.

Why (issue 13): PPO's critic sees the observations, not the item, so it cannot predict how hard an item is for the
reward's baseline setting. With the reward against fixed K3V2, the per-item difference between K3V2 and the
static schedule alone spreads by ~2 nats (paired over the held-out items), while the gains a controller might
make over the schedule are ~0.1-0.3 nats: the critic's explained variance stayed ≈ 0 and the advantages were
mostly that item noise. Subtracting the reference's return on the *same* episode (a self-critical baseline,
as in self-critical sequence training) removes it: a policy that plays the reference's actions gets exactly 0,
and only its departures from the reference are paid, by what they gained or lost on that item.

The reference's return is computed once per episode of the env's episode set (the env must have one: a row then
has fixed shots, so ``reset(options={"row": r})`` replays the episode) and kept; the first pass over the set
costs one reference episode per row. The reward terms are the env's own, so the wrapped return is in the same
units (nats for ``baseline_improvement``), and ``info["reference_return"]`` carries the subtracted amount at the
episode's end.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from agents.base import Policy
from agents.rollout import rollout


class ReferenceReturnWrapper(gym.Wrapper):
    """``env`` whose terminal reward has the reference policy's return on the same episode subtracted."""

    def __init__(self, env: gym.Env, reference: Policy):
        super().__init__(env)
        if getattr(env.unwrapped, "episodes", None) is None:
            raise ValueError("a reference return needs the env's episode set (EnvConfig.episodes, e.g. "
                             "'train-0-200'): without one every reset draws fresh shots, so no episode can be replayed")
        self.reference = reference
        self.reference_returns: dict[int, float] = {}  # by row
        self._baseline = 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        row = int(info["row"])
        if row not in self.reference_returns:
            self.reference_returns[row] = rollout(self.env, self.reference, options={"row": row}).total_reward
            obs, info = self.env.reset(options={"row": row})  # the same episode again, for the learner
        self._baseline = self.reference_returns[row]
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            reward = float(reward) - self._baseline
            info = {**info, "reference_return": self._baseline}
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """The env's masks (MaskablePPO reads them through the wrapper)."""
        return self.env.unwrapped.action_masks()

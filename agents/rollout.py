"""One episode of any policy on one env: the only episode loop of the project.

Collect, evaluate, sensitivity and the env benchmark all need "reset, then predict and step until the
episode ends"; they differ in what they read along the way (features and labels, the final scores,
per-step timings), so the loop records everything they read once, in an :class:`Episode`, and a
``callback`` covers what must happen *between* steps (the benchmark's interleaved bare forwards).

A policy is anything with stable-baselines3's ``predict(obs, state=None, episode_start=None,
deterministic=True) -> (action, state)``: our policies, SB3 models, or :class:`Schedule` (actions
given in advance, one per block). ``episode_start`` is ``[True]`` on the first decision of the
episode, as SB3's recurrent policies expect. Where the env has ``action_masks()`` (kvgym's env, with or
without a ``bit_budget``) and the policy's ``predict`` takes ``action_masks`` (our policies,
sb3-contrib's MaskablePPO), the loop passes the env's current mask every step, so the policy falls back
under the budget itself; a policy that does not take it (a plain SB3 model) is pushed back by the env.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["Episode", "Schedule", "rollout"]


@dataclass
class Episode:
    """What one episode produced. ``observations[i]`` is what ``actions[i]`` was chosen on; ``infos[i]``,
    ``rewards[i]`` and ``timings[i + 1]`` come from the step that action took."""

    reset_info: dict[str, Any]
    observations: list[np.ndarray] = field(default_factory=list)
    #: one per step: the action index, or (layer groups) a list of one index per group
    actions: list[int | list[int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    final_observation: np.ndarray | None = None
    terminated: bool = False
    truncated: bool = False
    #: The env's ``timings`` after reset (index 0) and after every step (empty if the env has none).
    timings: list[dict[str, float]] = field(default_factory=list)
    #: Wall ms of reset (index 0) and of every step, each ``env.step`` call alone.
    wall_ms: list[float] = field(default_factory=list)
    #: Wall ms of the whole episode (reset, predictions, steps) minus the env's reference pass
    #: (``timings["reference_ms"]`` after reset): the cost of running the policy, not of the yardstick.
    ms: float = 0.0

    @property
    def final_info(self) -> dict[str, Any]:
        return self.infos[-1] if self.infos else self.reset_info

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))

    def __len__(self) -> int:
        return len(self.actions)


class Schedule:
    """A policy that plays given actions in order, one per decision, from the start of each episode.

    An action is an int (a ``Discrete`` env) or a sequence of ints, one per layer group (``MultiDiscrete``)."""

    def __init__(self, actions: Sequence[int | Sequence[int]]):
        self.actions = [np.asarray(a, dtype=np.int64) if np.ndim(a) else np.int64(a) for a in actions]
        self._next = 0

    def predict(
        self, obs: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True, action_masks: Any = None
    ):
        """The next planned action. ``action_masks`` is accepted and not applied: a schedule does not know the
        menu's costs, and the env pushes an infeasible planned action under its budget (``info`` says so)."""
        if episode_start is not None and bool(np.asarray(episode_start).reshape(-1)[0]):
            self._next = 0
        if self._next >= len(self.actions):
            raise ValueError(f"the schedule has {len(self.actions)} actions; the episode asks for more")
        action = self.actions[self._next]
        self._next += 1
        return action, state


def _plain_action(action: Any) -> int | list[int]:
    """An int (Discrete), or one int per layer group (MultiDiscrete)."""
    arr = np.asarray(action)
    return int(arr.reshape(())) if arr.size == 1 else [int(a) for a in arr.reshape(-1)]


def _takes_masks(policy) -> bool:
    """Whether ``policy.predict`` accepts ``action_masks`` (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(policy.predict).parameters
    except (TypeError, ValueError):
        return False
    return "action_masks" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _timings(env: gym.Env) -> dict[str, float] | None:
    timings = getattr(env.unwrapped, "timings", None)
    return dict(timings) if timings is not None else None


def rollout(
    env: gym.Env,
    policy,
    *,
    options: dict[str, Any] | None = None,
    seed: int | None = None,
    deterministic: bool = True,
    callback: Callable[[Episode], None] | None = None,
) -> Episode:
    """Run one episode of ``policy`` on ``env`` (``reset(seed=seed, options=options)``, then steps until
    terminated or truncated). ``callback(episode)`` runs after reset and after every step, outside
    the timed calls; ``len(episode)`` says how many steps have been taken."""
    t_start = time.perf_counter()
    obs, info = env.reset(seed=seed, options=options)
    episode = Episode(reset_info=info, wall_ms=[1000 * (time.perf_counter() - t_start)])
    timings = _timings(env)
    reference_ms = timings.get("reference_ms", 0.0) if timings is not None else 0.0
    callback_s = 0.0

    def record(t: dict[str, float] | None) -> None:
        if t is not None:
            episode.timings.append(t)

    def call_back() -> float:
        if callback is None:
            return 0.0
        t0 = time.perf_counter()
        callback(episode)
        return time.perf_counter() - t0

    record(timings)
    callback_s += call_back()
    state = None
    masks_of = getattr(env.unwrapped, "action_masks", None) if _takes_masks(policy) else None
    while not episode.done:
        masks = {} if masks_of is None else {"action_masks": masks_of()}
        action, state = policy.predict(
            obs, state=state, episode_start=np.array([not episode.actions]), deterministic=deterministic, **masks
        )
        t0 = time.perf_counter()
        next_obs, reward, terminated, truncated, info = env.step(action)
        episode.wall_ms.append(1000 * (time.perf_counter() - t0))
        episode.observations.append(obs)
        episode.actions.append(_plain_action(action))
        episode.rewards.append(float(reward))
        episode.infos.append(info)
        record(_timings(env))
        obs, episode.terminated, episode.truncated = next_obs, bool(terminated), bool(truncated)
        callback_s += call_back()
    episode.final_observation = obs
    episode.ms = 1000 * (time.perf_counter() - t_start - callback_s) - reference_ms
    return episode

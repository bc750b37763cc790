"""Any saved stable-baselines3 agent (PPO by default) behind the common Policy interface.

The model's own ``predict`` does the work; this wrapper resolves the algorithm by name, and checks
the saved spaces against the env before anything runs, because an agent trained on another feature
set or bit set would otherwise act on misread observations without complaint.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.base import Policy

DEFAULT_ALGO = "PPO"


def known_algorithms() -> dict[str, type]:
    """Algorithm classes exported by ``stable_baselines3`` (PPO, A2C, DQN, SAC, ...) and by ``sb3_contrib``
    (MaskablePPO, RecurrentPPO, QRDQN, TRPO, ...), by class name.

    sb3-contrib is where MaskablePPO lives (the learner of budgeted control: the env's ``action_masks``);
    it is optional, so without it only stable-baselines3's algorithms are known.
    """
    import stable_baselines3
    from stable_baselines3.common.base_class import BaseAlgorithm

    modules = [stable_baselines3]
    try:
        import sb3_contrib
    except ImportError:
        pass
    else:
        modules.append(sb3_contrib)
    out = {}
    for module in modules:
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, BaseAlgorithm):
                out.setdefault(name, obj)  # stable-baselines3's class wins a (so far hypothetical) name clash
    return out


def resolve_algorithm(name: str) -> type:
    """The stable-baselines3 or sb3-contrib class called ``name`` (case-insensitive)."""
    algos = known_algorithms()
    for key, cls in algos.items():
        if key.lower() == name.lower():
            return cls
    raise ValueError(f"unknown stable-baselines3 / sb3-contrib algorithm {name!r}; known: {sorted(algos)}")


def _describe(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Box):
        return f"Box(shape={space.shape}, dtype={space.dtype})"
    return repr(space)


def _same_space(a: gym.Space, b: gym.Space) -> bool:
    """Same kind and layout; Box bounds may differ (they are documentation, not what the net reads)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, gym.spaces.Discrete):
        return int(a.n) == int(b.n)
    if isinstance(a, gym.spaces.MultiDiscrete):  # layer groups: one setting per group
        return a.nvec.tolist() == b.nvec.tolist()
    return a.shape == b.shape


def _expected_spaces(
    env_or_spaces: Any, observation_names: Sequence[str] | None, bits: Sequence[int] | None
) -> tuple[gym.Space, gym.Space] | None:
    if env_or_spaces is not None:
        if isinstance(env_or_spaces, tuple | list) and len(env_or_spaces) == 2:
            return env_or_spaces[0], env_or_spaces[1]
        return env_or_spaces.observation_space, env_or_spaces.action_space
    if observation_names is not None and bits is not None:
        obs = gym.spaces.Box(-np.inf, np.inf, shape=(len(observation_names),), dtype=np.float32)
        return obs, gym.spaces.Discrete(len(bits))
    return None


class SB3Policy(Policy):
    """A stable-baselines3 model loaded from ``path``.

    ``env_or_spaces`` (an env, or an ``(observation_space, action_space)`` pair) is what the saved spaces
    are checked against; without it they are checked against ``observation_names``/``bits`` if given.
    Those default to the env's ``unwrapped.observation_names``/``bits`` when an env is passed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        env_or_spaces: Any = None,
        algo: str | None = None,
        *,
        observation_names: Sequence[str] | None = None,
        bits: Sequence[int] | None = None,
    ):
        unwrapped = getattr(env_or_spaces, "unwrapped", None)
        observation_names = observation_names or getattr(unwrapped, "observation_names", None)
        bits = bits or getattr(unwrapped, "bits", None)
        path = Path(path)
        if not path.is_file() and path.with_name(path.name + ".zip").is_file():
            path = path.with_name(path.name + ".zip")  # SB3 itself saves "x" as "x.zip"
        if not path.is_file():
            raise FileNotFoundError(
                f"stable-baselines3 model {path} not found; train one with experiments.train_ppo"
            )
        self.algo = (algo or DEFAULT_ALGO).upper()
        cls = resolve_algorithm(self.algo)
        try:
            self.model = cls.load(path, device="cpu")
        except Exception as e:
            raise ValueError(
                f"could not load {path} as {cls.__name__} ({type(e).__name__}: {e}); if it was trained with another "
                f"algorithm pass it, e.g. 'sb3:A2C:{path}'"
            ) from e
        self.path = path
        self._check_spaces(_expected_spaces(env_or_spaces, observation_names, bits))

        space = self.model.observation_space
        n_obs = int(np.prod(space.shape)) if space.shape else 1
        action_space = self.model.action_space
        n_act = int(action_space.nvec[0]) if isinstance(action_space, gym.spaces.MultiDiscrete) else int(
            getattr(action_space, "n", 1)
        )
        super().__init__(
            observation_names or [f"obs_{i}" for i in range(n_obs)],
            bits or list(range(1, n_act + 1)),
        )
        self.name = self.algo.lower()
        if getattr(unwrapped, "protect_bits", None) is not None:  # per-token marks: setting + one 0/1 per slot
            self.protect_slots = len(action_space.nvec) - 1
        elif isinstance(action_space, gym.spaces.MultiDiscrete):
            self.layer_groups = len(action_space.nvec)

    def _check_spaces(self, expected: tuple[gym.Space, gym.Space] | None) -> None:
        if expected is None:
            return
        for what, saved, env_space in (
            ("observation", self.model.observation_space, expected[0]),
            ("action", self.model.action_space, expected[1]),
        ):
            if not _same_space(saved, env_space):
                raise ValueError(
                    f"{self.path}: saved {what} space {_describe(saved)} does not match the env's "
                    f"{_describe(env_space)}; the agent was trained on a different env config "
                    "(observation features or bits) — retrain it or evaluate with that config"
                )

    def set_protect_slots(self, slots: int) -> None:
        """The saved agent's action space fixes its slots (set from the env when it has ``protect_bits``)."""
        if slots != self.protect_slots:
            raise ValueError(
                f"{self.path} acts with {self.protect_slots} token slots but the env has {slots}; retrain it or "
                "evaluate with that config"
            )

    def set_layer_groups(self, groups: int) -> None:
        """The saved agent's action space fixes its layer groups: ``MultiDiscrete`` of G, or 1 for ``Discrete``."""
        space = self.model.action_space
        trained = len(space.nvec) if isinstance(space, gym.spaces.MultiDiscrete) else 1
        if groups != trained:
            raise ValueError(
                f"{self.path} was trained with layer_groups={trained} but the env has layer_groups={groups}; "
                "retrain it or evaluate with that config"
            )
        self.layer_groups = int(groups)

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        actions, _ = self.model.predict(obs2d, deterministic=deterministic)
        return np.asarray(actions, dtype=np.int64).reshape(len(obs2d), *self.model.action_space.shape)

    @property
    def reads_masks(self) -> bool:
        """Whether the model's own ``predict`` takes ``action_masks`` (sb3-contrib's MaskablePPO does)."""
        return "action_masks" in inspect.signature(self.model.predict).parameters

    def predict(
        self,
        obs: Any,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = True,
        action_masks: Any = None,
    ) -> tuple[np.ndarray, Any]:
        """Delegates to the SB3 model (recurrent state and episode starts pass straight through).

        ``action_masks``: a maskable model (MaskablePPO) samples among the allowed actions itself; any
        other model's action is pushed under the mask afterwards with the env's fallback
        (``envs.budget.fallback_action``: the most precise allowed setting below it)."""
        if action_masks is not None and self.reads_masks:
            return self.model.predict(
                obs, state=state, episode_start=episode_start, deterministic=deterministic, action_masks=action_masks
            )
        actions, state = self.model.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
        if action_masks is not None:
            actions = self.apply_masks(actions, action_masks)
        return actions, state


def behaviour_clone(
    model: Any,
    observations: np.ndarray,
    actions: np.ndarray,
    action_masks: np.ndarray | None = None,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit an SB3 actor-critic's policy to a teacher's actions (maximum likelihood), before RL starts.

    Why: PPO from scratch needs ~18k steps under a budget just to reach the searched static schedule; started
    from a copy of that schedule it spends its steps on what the schedule cannot do (per-item choices). Only
    the actor learns here (the critic has no returns yet; PPO fits it in its first updates). With
    ``action_masks`` (MaskablePPO) the likelihood is the masked distribution's, so the teacher's actions are
    learned among the settings the budget allowed. Returns the last epoch's mean loss and the share of
    teacher actions the deterministic policy reproduces.
    """
    if len(observations) != len(actions) or (action_masks is not None and len(action_masks) != len(actions)):
        raise ValueError(f"behaviour_clone needs one action (and mask) per observation, got {len(observations)} "
                         f"observations, {len(actions)} actions"
                         + ("" if action_masks is None else f", {len(action_masks)} masks"))
    if len(actions) == 0 or epochs < 1 or batch_size < 1:
        raise ValueError(f"behaviour_clone needs data, epochs >= 1 and batch_size >= 1; got {len(actions)} samples, "
                         f"epochs={epochs}, batch_size={batch_size}")
    policy = model.policy
    obs = torch.as_tensor(np.asarray(observations, dtype=np.float32), device=policy.device)
    acts = torch.as_tensor(np.asarray(actions, dtype=np.int64), device=policy.device)
    masks = None if action_masks is None else np.asarray(action_masks, dtype=bool)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    kwargs = (lambda idx: {}) if masks is None else (lambda idx: {"action_masks": masks[idx.numpy()]})
    policy.set_training_mode(True)
    loss_sum = 0.0
    for _ in range(epochs):
        order, loss_sum = torch.randperm(len(acts), generator=generator), 0.0
        for start in range(0, len(acts), batch_size):
            idx = order[start : start + batch_size]
            _, log_prob, _ = policy.evaluate_actions(obs[idx], acts[idx], **kwargs(idx))
            loss = -log_prob.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
    policy.set_training_mode(False)
    with torch.no_grad():
        every = torch.arange(len(acts))
        dist = policy.get_distribution(obs, **kwargs(every))
        agree = (dist.get_actions(deterministic=True) == acts).float().mean()
    return {"loss": loss_sum / len(acts), "agreement": float(agree)}

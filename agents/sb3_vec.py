"""SB3VecEnv: a Gymnasium ``VectorEnv`` (e.g. kvgym's batched env) behind stable-baselines3's ``VecEnv``.

Why an adapter: SB3 steps its own ``VecEnv`` API (``step_async``/``step_wait``, infos as a list of
dicts, a row reset in the step it ends with ``terminal_observation`` in its info), while a Gymnasium
1.x vector env returns infos as a dict of arrays with ``_key`` masks. The adapter asks the vector env
for SAME_STEP autoreset (``gym.make_vec(..., autoreset_mode="same_step")``; a NEXT_STEP env is
refused, as SB3 would learn from the ignored actions of reset steps) and converts each step.

Action masks: sb3-contrib's MaskablePPO reads them with ``env_method("action_masks")``, which reaches
the vector env's rows (each a ``KVPrecisionEnv`` with ``action_masks()``); :meth:`SB3VecEnv.action_masks`
is the same ``[num_envs, n_actions]`` array from the vector env in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

__all__ = ["SB3VecEnv", "row_infos"]


def row_infos(infos: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """Gymnasium's vector infos (arrays + ``_key`` masks, nested dicts alike) as one dict per row."""
    rows: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        nested = row_infos(value, num_envs) if isinstance(value, dict) else None
        for i in range(num_envs):
            if mask[i]:
                item = nested[i] if nested is not None else value[i]
                rows[i][key] = item.item() if isinstance(item, np.generic) else item
    return rows


class SB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over a Gymnasium ``VectorEnv`` that autoresets in the same step (see module docstring)."""

    def __init__(self, vector_env: gym.vector.VectorEnv):
        mode = vector_env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3VecEnv needs a vector env in SAME_STEP autoreset mode, got {mode}; make it with "
                'gym.make_vec(..., vectorization_mode="vector_entry_point", autoreset_mode="same_step")'
            )
        self.vector_env = vector_env
        super().__init__(vector_env.num_envs, vector_env.single_observation_space, vector_env.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self):
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        options = self._options[0] if self._options[0] else None
        obs, infos = self.vector_env.reset(seed=seeds, options=options)
        self.reset_infos = row_infos(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        obs, rewards, terminations, truncations, infos = self.vector_env.step(self._actions)
        dones = terminations | truncations
        out = row_infos(infos, self.num_envs)
        for i in np.nonzero(dones)[0]:
            final = dict(out[i].get("final_info", {}))
            final["terminal_observation"] = out[i]["final_obs"]
            final["TimeLimit.truncated"] = bool(truncations[i] and not terminations[i])
            self.reset_infos[i] = {k: v for k, v in out[i].items() if k not in ("final_obs", "final_info")}
            out[i] = final
        return obs, rewards.astype(np.float32), dones, out

    def close(self) -> None:
        self.vector_env.close()

    def action_masks(self) -> np.ndarray:
        """``[num_envs, n_actions]`` bool: the vector env's masks (what ``get_action_masks`` stacks row by row)."""
        masks = getattr(self.vector_env, "action_masks", None)
        if masks is None:
            return np.stack(self.env_method("action_masks"))
        return np.asarray(masks())

    # --- attribute access: the rows are the vector env's single envs ------------------------------
    def _rows(self, indices: VecEnvIndices) -> list[Any]:
        envs = getattr(self.vector_env, "envs", None)
        if envs is None:
            raise AttributeError(f"{type(self.vector_env).__name__} exposes no per-row envs")
        return [envs[i] for i in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(env, attr_name) for env in self._rows(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for env in self._rows(indices):
            setattr(env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        return [getattr(env, method_name)(*method_args, **method_kwargs) for env in self._rows(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

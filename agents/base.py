"""The one interface every KV-precision policy answers.

Policies mimic a stable-baselines3 model (``predict(obs, state, episode_start, deterministic,
action_masks)``, the last as sb3-contrib's MaskablePPO takes it) so that
evaluation code runs a hand-made rule, a supervised MLP and a PPO agent through the same loop.
They are built from the env's ``observation_names`` and ``bits`` rather than from a positional layout,
so a feature is read by name and a policy built for one observation layout fails loudly on another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from envs.budget import masked_actions
from envs.settings import Setting, mean_bits, normalize_setting, settings_by_cost


def _setting(b: Any) -> Setting:
    """A menu entry as ``env.bits`` holds it; plain ints are taken as they are (a policy loaded without
    its env may carry placeholder widths), pairs must be supported widths."""
    if isinstance(b, str) or np.ndim(b) == 1:
        return normalize_setting(b)
    return int(b)


def _pair(s: Setting) -> tuple[int, int]:
    return s if isinstance(s, tuple) else (s, s)


class Policy(ABC):
    """Maps observations (flat float vectors named by ``observation_names``) to indices into ``bits``.

    ``bits`` is the env's menu: ints (keys and values at that width) and ``(key_bits, value_bits)``
    tuples (``envs.settings``)."""

    #: The policy's canonical name, the same in its spec, records, references, reports and wandb
    #: ("fixed:4", "fp16", "rule", "mlp", "ppo"); ``agents.registry.make_policy`` sets it from the spec.
    name: str = "policy"
    #: Whether the policy can act on an env with ``layer_groups > 1`` (see :meth:`set_layer_groups`).
    supports_layer_groups: bool = True
    #: What to do instead, in the error a policy that does not support layer groups raises.
    layer_groups_hint: str = "use a policy that does"

    def __init__(self, observation_names: Sequence[str], bits: Sequence[int]):
        names = tuple(str(n) for n in observation_names)
        if not names:
            raise ValueError("observation_names is empty; pass env.unwrapped.observation_names")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"observation_names has duplicates: {dupes}")
        menu = tuple(_setting(b) for b in bits)
        if not menu or len(set(menu)) != len(menu) or min(min(_pair(s)) for s in menu) <= 0:
            raise ValueError(
                f"bits must be distinct settings (positive ints or (key_bits, value_bits) pairs), got {tuple(bits)!r}"
            )
        self.observation_names: tuple[str, ...] = names
        #: the env's menu, normalized as ``env.bits`` is (``envs.settings``): ints and (k, v) tuples
        self.bits: tuple[Setting, ...] = menu
        #: settings per action: 1 (Discrete), or the env's ``layer_groups`` (see :meth:`set_layer_groups`)
        self.layer_groups: int = 1
        #: token slots of a per-token action (the env's ``interval`` when it has ``protect_bits``, else 0)
        self.protect_slots: int = 0

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
        """Action indices for requested bit-widths (bits per K/V element, e.g. 3 or 4).

        Each request maps to the *cheapest setting at or above it*, settings ordered by
        :func:`envs.settings.settings_by_cost`: by mean bits ((key + value) / 2; K4V2 is 3), and at equal
        mean bits the one with more key bits first (K4V2 before K2V4: keys are the sensitive half). So
        3 -> K4V2 in a menu (2, K4V2, 4) and 3 -> 4 in (2, 4, 8); a policy that asks for some precision
        never gets less than it asked for, and a request above every setting gets the dearest one.
        Returns an int64 array shaped like ``bits_values``.
        """
        req = np.asarray(bits_values, dtype=np.float64)
        order = np.asarray(settings_by_cost(self.bits), dtype=np.int64)  # env bits need not be sorted
        costs = np.asarray([mean_bits(self.bits[i]) for i in order], dtype=np.float64)
        pos = np.searchsorted(costs, req, side="left")
        pos = np.minimum(pos, len(order) - 1)
        return order[pos].astype(np.int64)

    def set_layer_groups(self, groups: int) -> None:
        """Act for an env with ``groups`` layer groups (a ``MultiDiscrete`` action, one setting per group).

        The default: the policy's one choice per block goes to every group (fixed settings and the
        rule, whose features describe the whole block). A policy that cannot act so sets
        ``supports_layer_groups = False`` and refuses here.
        """
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"layer_groups must be an integer >= 1, got {groups!r}")
        if groups > 1 and not self.supports_layer_groups:
            raise ValueError(
                f"{type(self).__name__} ({self.name!r}) chooses one setting per block, not one per layer group; "
                f"{self.layer_groups_hint} (or set the env's layer_groups to 1)"
            )
        self.layer_groups = int(groups)

    def set_protect_slots(self, slots: int) -> None:
        """Act for an env with ``protect_bits`` (issue 15): each action is the block's setting, then one 0/1
        mark per token slot. A policy whose :meth:`act` gives settings only marks nothing (it acts as on an
        env without per-token choice); one that marks tokens returns ``[n, 1 + slots]`` from :meth:`act`."""
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 0:
            raise ValueError(f"protect slots must be an integer >= 0, got {slots!r}")
        if slots and self.layer_groups != 1:
            raise ValueError("per-token marks need layer_groups 1 (the env refuses protect_bits with layer groups)")
        self.protect_slots = int(slots)

    def apply_masks(self, actions: np.ndarray, action_masks: Any) -> np.ndarray:
        """``actions`` pushed under the env's ``action_masks`` as the env itself would (``envs.budget``).

        With per-token marks the settings' part of each mask rules the setting, and a mark on a slot the
        mask does not allow marking (past the block's end) is cleared."""
        if not self.protect_slots:
            return masked_actions(self.bits, actions, action_masks)
        acts = np.array(actions, dtype=np.int64)
        rows = acts.reshape(-1, 1 + self.protect_slots)
        masks = np.asarray(action_masks, dtype=bool).reshape(len(rows), -1)
        n_menu = len(self.bits)
        if masks.shape[1] != n_menu + 2 * self.protect_slots:
            raise ValueError(
                f"action_masks have {masks.shape[1]} entries per row; per-token actions over a menu of {n_menu} "
                f"settings and {self.protect_slots} slots need {n_menu + 2 * self.protect_slots}"
            )
        rows[:, 0] = masked_actions(self.bits, rows[:, 0], masks[:, :n_menu])
        may_mark = masks[:, n_menu:].reshape(len(rows), self.protect_slots, 2)[:, :, 1]
        rows[:, 1:] *= may_mark
        return rows.reshape(acts.shape)

    # ----------------------------------------------------------------------------------- the interface
    @abstractmethod
    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Actions (int64 indices into ``bits``) for a 2-D batch of observations: 1-D, one per observation
        (with layer groups :meth:`predict` gives it to every group), or ``[n, layer_groups]``; with per-token
        marks (:meth:`set_protect_slots`) a policy that marks tokens gives ``[n, 1 + protect_slots]``."""

    def predict(
        self,
        obs: Any,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = True,
        action_masks: Any = None,
    ) -> tuple[np.ndarray, Any]:
        """SB3-compatible: a 1-D ``obs`` gives a 0-d action array, a 2-D batch a 1-D one; ``state`` passes through.

        ``action_masks`` (sb3-contrib's MaskablePPO convention; the env's ``action_masks()``: one bool per
        setting, ``[n, n_actions]`` for a batch, layer groups' masks concatenated): an action it forbids
        is replaced by the most precise allowed setting below it, the env's own fallback
        (``envs.budget.fallback_action``), so the policy's actions are exactly what the env commits."""
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
        actions = np.asarray(self.act(arr[None, :] if single else arr, deterministic=deterministic)).astype(np.int64)
        if self.protect_slots:
            if actions.ndim == 1:  # settings only: no token marked
                actions = np.concatenate([actions[:, None], np.zeros((len(actions), self.protect_slots), np.int64)], 1)
        elif self.layer_groups == 1:
            actions = actions.reshape(-1)
        elif actions.ndim == 1:  # one choice per block: every layer group gets it
            actions = np.repeat(actions[:, None], self.layer_groups, axis=1)
        actions = actions[0] if single else actions
        if action_masks is not None:
            actions = self.apply_masks(actions, action_masks)
        return actions, state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bits={self.bits})"

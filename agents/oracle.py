"""The per-item greedy oracle: an upper bound for evaluation, never a policy that could be deployed
(except as ``return-oracle`` on a reward that reads only the prompt, below).

At each block it tries every setting the budget allows, each time completing the episode the
*completion* way (one fixed setting, or a static schedule's actions for the later blocks), reads the
terminal gold-ending log-likelihood change (or, as ``blind-oracle``, the mean log-likelihood of all the
endings; as ``return-oracle``, the env's own reward summed from the block on), keeps the best and moves
on from it. Ties keep the completion's own action, else the cheaper setting: a block whose setting the
objective cannot see (the prompt's last block, under the reward ``prompt_loglik``) is left as the
completion has it rather than dropped to the cheapest. It sees the item's own
passes (the endings included), so it measures headroom: how much a controller that knew each block's
real damage could gain. It needs the env's state at each block, which :meth:`envs.kv_precision.KVPrecisionEnv.snapshot`
gives, so it acts through :meth:`OraclePolicy.plan` (a whole episode's actions for one item), not
through ``predict``; ``experiments.evaluate`` replays a plan with ``agents.rollout.Schedule``.

Why it is never worse than its completion on an item: at every block the completion's own action is
a candidate, and choosing it reproduces exactly the episode that was the best completion one block
earlier (the env is deterministic and a restored snapshot continues bit-identically; where the budget
made the env replace that action, the replacement is the candidate), so the best value can only grow
from block to block, starting from the completion's own episode. Completing with the static schedule
(``oracle:<schedule.json>``) therefore bounds what a per-item controller could gain *over that
schedule*: the headroom a learned policy has to beat the search baseline.
Cost: about ``blocks^2 / 2 * settings`` block forwards per item (~9 blocks, 6 settings: ~250).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from agents.base import Policy
from agents.static import StaticSchedulePolicy
from envs.settings import Setting, mean_bits, normalize_setting, parse_setting, setting_name, settings_by_cost

#: Slack on the budget comparison, as everywhere a final ``avg_bits`` is checked against a budget.
BUDGET_TOLERANCE = 1e-9
#: Most candidate actions per block with layer groups (every combination of settings is tried).
MAX_CANDIDATES = 256

Action = int | list[int]


class PlanningPolicy(Policy):
    """A policy that decides a whole episode per item (:meth:`plan`) instead of per observation.

    ``experiments.evaluate`` runs one by calling ``plan(env, row)`` and replaying the actions with
    ``agents.rollout.Schedule`` through ``agents.rollout.rollout``, so its records are like any other's.
    """

    @abstractmethod
    def plan(self, env: Any, row: int) -> list[Action]:
        """The actions of the episode on the task's row ``row`` (``reset(options={"row": row})``)."""

    def predict(self, obs: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True,
                **kwargs: Any):
        raise TypeError(
            f"{type(self).__name__} ({self.name!r}) plans per item: call plan(env, row) and replay the actions with "
            "agents.rollout.Schedule (experiments.evaluate does); it cannot act on an observation alone")

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return self.predict(obs2d)


class OraclePolicy(PlanningPolicy):
    """Per-item greedy oracle (see the module docstring).

    ``completion``: how every branch completes: a setting (a name like ``"k4v2"``, or a setting) at
    every later block, or a :class:`~agents.static.StaticSchedulePolicy` (its actions for the later
    blocks of the item's prompt); default: the dearest menu setting whose mean bits fit the budget (the
    dearest of all without one).
    ``budget``: the average-bits budget; default: the env's ``bit_budget`` (None: no budget). A
    candidate is skipped when the env's ``action_masks()`` masks it, and discarded when its completed
    episode ends over the budget.
    ``objective``: what a completed branch is worth: ``"gold"``, the gold ending's log-lik change (the
    score the study reports), or ``"endings"``, the mean log-lik of *all* the item's endings under the
    quantized cache: blind to which ending is gold, so its choices are about how well the prompt is
    remembered, not about which noise favours the right answer (spec ``blind-oracle``); or ``"return"``,
    the env's own reward summed over the branch's steps (spec ``return-oracle``): a search for whatever
    reward the env is given. With the reward ``prompt_loglik`` it reads only the prompt's own tokens, so it
    is a per-item search that a deployment could run at prefill (it never sees an ending).
    """

    OBJECTIVES = ("gold", "endings", "return")
    KINDS = {"gold": "oracle", "endings": "blind-oracle", "return": "return-oracle"}

    def __init__(self, observation_names: Sequence[str], bits: Sequence[Any], completion: Any = None,
                 budget: float | None = None, objective: str = "gold"):
        super().__init__(observation_names, bits)
        if objective not in self.OBJECTIVES:
            raise ValueError(f"oracle objective must be one of {self.OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.completion: Setting | None = None
        self.schedule: StaticSchedulePolicy | None = None
        if isinstance(completion, StaticSchedulePolicy):
            if completion.bits != self.bits:
                raise ValueError(f"the oracle's completion schedule was built for the menu {completion.bits}, the "
                                 f"oracle for {self.bits}")
            self.schedule = completion
        elif completion is not None:
            self.completion = parse_setting(completion) if isinstance(completion, str) else normalize_setting(completion)
            if self.completion not in self.bits:
                raise ValueError(f"oracle completion setting {setting_name(self.completion)} is not in the env's menu "
                                 f"{[setting_name(b) for b in self.bits]}")
        self.budget = None if budget is None else float(budget)
        kind = self.KINDS[objective]
        self.name = (f"{kind}:static" if self.schedule is not None else
                     kind if self.completion is None else f"{kind}:{setting_name(self.completion)}")
        #: the objective's value of the last plan (with "gold": the log-lik delta its replay scores; with
        #: "return": the replay's whole return)
        self.last_value: float | None = None

    def completion_index(self, budget: float | None) -> int:
        """Menu index of the completion setting under ``budget``."""
        if self.completion is not None:
            return self.bits.index(self.completion)
        order = settings_by_cost(self.bits)
        fitting = [i for i in order if budget is None or mean_bits(self.bits[i]) <= budget + BUDGET_TOLERANCE]
        if not fitting:
            raise ValueError(f"no setting of the menu {[setting_name(b) for b in self.bits]} fits the budget {budget} "
                             "average bits; raise the budget or add a cheaper setting")
        return fitting[-1]

    def plan(self, env: Any, row: int) -> list[Action]:
        base = env.unwrapped
        if tuple(base.bits) != self.bits:
            raise ValueError(f"the oracle was built for the menu {self.bits}, the env has {tuple(base.bits)}")
        budget = self.budget if self.budget is not None else getattr(base.config, "bit_budget", None)
        groups = int(getattr(base, "layer_groups", 1))
        candidates = _candidates(self.bits, groups)
        base.reset(options={"row": row})
        finish = self._completion_actions(len(base.block_spans()), budget, groups)
        actions: list[Action] = []
        episode_return = 0.0
        while True:
            snap = base.snapshot()
            mask = _mask(base)
            best: tuple[Action, float] | None = None
            own = finish[len(actions)]  # the completion's action here: a tie keeps it, else the cheaper
            for action in candidates:  # cheapest first
                if mask is not None and not _allowed(mask, action, len(self.bits)):
                    continue
                base.restore(snap)
                value, avg_bits = _complete(base, action, finish[len(actions) + 1:], self.objective)
                if budget is not None and avg_bits > budget + BUDGET_TOLERANCE:
                    continue
                if best is None or value > best[1] or (value == best[1] and action == own):
                    best = (action, value)
            if best is None:
                raise ValueError(
                    f"row {row}, block {len(actions)}: every candidate completed as {self.name} ends over the budget of "
                    f"{budget} average bits (fp16 sink tokens count 16); choose a cheaper completion setting "
                    "('oracle:<setting>')")
            base.restore(snap)
            _, reward, terminated, truncated, _ = base.step(best[0])
            actions.append(best[0])
            episode_return += float(reward)
            if terminated or truncated:
                self.last_value = episode_return if self.objective == "return" else best[1]
                return actions

    def _completion_actions(self, n_blocks: int, budget: float | None, groups: int) -> list[Action]:
        """The completion's action at each of the ``n_blocks`` blocks of the item's prompt."""
        if self.schedule is not None:
            self.schedule.set_layer_groups(groups)
            return self.schedule.actions_for(n_blocks)
        completion = self.completion_index(budget)
        return [completion if groups == 1 else [completion] * groups for _ in range(n_blocks)]


def _complete(env: Any, action: Action, later: Sequence[Action], objective: str = "gold") -> tuple[float, float]:
    """Commit ``action``, then each later block at its action in ``later``; the terminal (value, avg_bits),
    the value being the gold ending's log-lik delta, with ``objective="endings"`` the mean log-lik of
    every ending (the same reference for every branch of an item, so it need not be subtracted), with
    ``objective="return"`` the rewards summed from this step on (the earlier ones are the same for every
    branch)."""
    _, reward, terminated, truncated, info = env.step(action)
    total = float(reward)
    for step_action in later:
        if terminated or truncated:
            break
        _, reward, terminated, truncated, info = env.step(step_action)
        total += float(reward)
    if not (terminated or truncated):
        raise RuntimeError(f"the completion ran out of actions ({len(later)}) before the episode ended")
    if objective == "return":
        return total, float(info["avg_bits"])
    value = float(info["loglik_delta"]) if objective == "gold" else float(np.mean(info["scores"]))
    return value, float(info["avg_bits"])


def _candidates(menu: Sequence[Setting], groups: int) -> list[Action]:
    """Every action, cheapest first (mean bits over groups; then the menu's cost order)."""
    rank = {i: r for r, i in enumerate(settings_by_cost(menu))}
    if groups == 1:
        return sorted(range(len(menu)), key=rank.__getitem__)
    if len(menu) ** groups > MAX_CANDIDATES:
        raise ValueError(f"the oracle tries every combination of settings over layer groups: {len(menu)}^{groups} > "
                         f"{MAX_CANDIDATES}; use fewer layer groups or a smaller menu")
    combos = itertools.product(range(len(menu)), repeat=groups)
    ordered = sorted(combos, key=lambda c: (sum(mean_bits(menu[i]) for i in c), [rank[i] for i in c]))
    return [list(c) for c in ordered]


def _mask(env: Any) -> np.ndarray | None:
    masks = getattr(env, "action_masks", None)
    return np.asarray(masks(), dtype=bool).reshape(-1) if callable(masks) else None


def _allowed(mask: np.ndarray, action: Action, n: int) -> bool:
    """Whether ``mask`` (Discrete: ``[n]``; MultiDiscrete: per-group masks concatenated) allows ``action``."""
    indices = [action] if isinstance(action, (int, np.integer)) else list(action)
    if mask.size == n:
        return all(bool(mask[i]) for i in indices)
    return all(bool(mask[g * n + i]) for g, i in enumerate(indices))

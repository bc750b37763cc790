"""The evidence teacher: keep the blocks that hold the answer precise, spend what is left from the end.

"Learning by cheating" (Chen et al., 2019): a privileged teacher that knows where the answer lies
(``KVPrecisionEnv.evidence_blocks``: the blocks overlapping the task's ``Task.evidence``, e.g. the
passkey needle, known to the generator) labels pool episodes, and the MLP controller learns to
reproduce its labels from observable features only (``experiments.collect`` with
``policy: evidence``, then ``experiments.train_mlp``). On held-out items it is an evaluation-only row,
like the oracle: it reads the item's evidence, which no deployable policy sees, so it is an
upper-bound-ish reference for what knowing *where* to keep precision is worth, not a result.

Its plan for one item (``plan(env, row)``), under the env's ``bit_budget`` (None: no budget):

1. **Evidence blocks** get the most precise menu setting (with ``evidence:<setting>``: the named one,
   or the most precise one below it when the named one does not fit) such that the plan stays within
   the budget with the cheapest setting on every other block. All evidence blocks get the same setting,
   unless the budget cannot raise them all to one setting: then they are raised one at a time, in prompt
   order, each to the dearest setting that still leaves the cheapest raise for every later evidence block
   (else to the cheapest raise, while it fits). Without this a tight budget would protect no evidence at
   all; with "dearest that fits" alone the first needle took the whole budget (a finer menu, K3V2 at 2.5
   bits, protects two needles where K4V2 protects one).
2. **Every other block** gets the dearest setting that fits when the remaining budget is spread
   evenly over them, never dearer than the evidence setting; then, from the last block (the question)
   backwards, each is raised to the dearest setting that still fits. Why spend the spare budget
   rather than leave them at the cheapest: the goal is the best accuracy under the budget, and a
   teacher that wastes budget teaches the controller to waste it; why from the end: the blocks right
   before the question are the ones the answer is decoded from (a hand schedule that lowered the
   last eighth of the prompt lost accuracy on HellaSwag).
   Without a budget there is nothing to spread: the other blocks get the cheapest setting, so the
   labels say exactly "evidence here, not there".

Whether a plan fits is decided by the env's own budget helpers (``envs.budget.plan_fits``: the mask
walked block by block, as the env's ``action_masks`` does), so the replayed plan is never pushed back by the
env and never ends over budget. The plan is deterministic (no randomness; ties keep the menu's cost
order from ``envs.settings.settings_by_cost``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agents.oracle import Action, PlanningPolicy
from envs.budget import plan_fits
from envs.settings import Setting, normalize_setting, parse_setting, setting_name, settings_by_cost

__all__ = ["EvidencePolicy", "plan_settings"]


def plan_settings(
    menu: Sequence[Setting], budget: float | None, blocks: Sequence[tuple[int, int]], evidence: Sequence[int],
    sink_tokens: int, evidence_setting: Setting | None = None,
) -> list[int]:
    """Menu indices, one per block, of the evidence teacher's plan (the module docstring's steps 1 and 2).

    ``blocks``: the episode's ``[start, end)`` token blocks; ``evidence``: the indices of the blocks
    holding evidence; ``evidence_setting``: the most precise setting evidence blocks may get (None:
    the menu's dearest)."""
    order = settings_by_cost(menu)  # menu indices, cheapest first
    cheapest = order[0]
    cap = len(order) - 1 if evidence_setting is None else order.index(menu.index(evidence_setting))
    evidence = sorted(set(evidence))
    others = [b for b in range(len(blocks)) if b not in evidence]
    plan = [cheapest] * len(blocks)

    def fits(candidate: list[int]) -> bool:
        return plan_fits(menu, budget, blocks, candidate, sink_tokens)

    def with_blocks(targets: Sequence[int], index: int) -> list[int]:
        candidate = list(plan)
        for b in targets:
            candidate[b] = index
        return candidate

    # 1. evidence blocks: the dearest setting up to the cap that fits with the cheapest elsewhere
    level = 0
    for rank in range(cap, -1, -1):
        if fits(with_blocks(evidence, order[rank])):
            level = rank
            break
    plan = with_blocks(evidence, order[level])
    if level == 0 and len(evidence) > 1 and cap > 0:
        # 1b. a budget too tight to raise every evidence block to one setting: in prompt order, each is
        # raised as far as it can while every later one can still get the cheapest raise; when even that
        # leaves no room, it takes the cheapest raise if that fits (so as many as fit are raised at all)
        for i, b in enumerate(evidence):
            later = evidence[i + 1 :]
            for rank in range(cap, 0, -1):
                candidate = with_blocks([b], order[rank])
                if fits([order[1] if j in later else index for j, index in enumerate(candidate)]):
                    plan = candidate
                    break
            else:
                if fits(with_blocks([b], order[1])):
                    plan = with_blocks([b], order[1])
    if budget is None or not others:
        return plan
    # 2a. the other blocks: the dearest even level that fits, never above the evidence setting
    for rank in range(level, 0, -1):
        if fits(with_blocks(others, order[rank])):
            plan = with_blocks(others, order[rank])
            break
    # 2b. the spare budget, from the last block backwards: each raised as far as it fits
    for b in reversed(others):
        for rank in range(level, order.index(plan[b]), -1):
            if fits(with_blocks([b], order[rank])):
                plan = with_blocks([b], order[rank])
                break
    return plan


class EvidencePolicy(PlanningPolicy):
    """The privileged evidence teacher (see the module docstring): on pool items a teacher for the MLP
    controller, on held-out items an evaluation-only reference (it reads the item's evidence).

    ``evidence_setting``: the most precise setting evidence blocks get (a name like ``"8"`` or
    ``"k4v2"``, or a setting; it must be on the menu); default: the menu's dearest.
    ``budget``: the average-bits budget; default: the env's ``bit_budget`` (None: no budget).
    """

    def __init__(self, observation_names: Sequence[str], bits: Sequence[Any], evidence_setting: Any = None,
                 budget: float | None = None):
        super().__init__(observation_names, bits)
        self.evidence_setting: Setting | None = None
        if evidence_setting is not None:
            setting = (parse_setting(evidence_setting) if isinstance(evidence_setting, str)
                       else normalize_setting(evidence_setting))
            if setting not in self.bits:
                raise ValueError(f"evidence setting {setting_name(setting)} is not in the env's menu "
                                 f"{[setting_name(b) for b in self.bits]}")
            self.evidence_setting = setting
        self.budget = None if budget is None else float(budget)
        self.name = "evidence" if self.evidence_setting is None else f"evidence:{setting_name(self.evidence_setting)}"
        #: the evidence blocks of the last plan (what it kept precise)
        self.last_evidence: list[int] = []

    def plan(self, env: Any, row: int) -> list[Action]:
        base = env.unwrapped
        if tuple(base.bits) != self.bits:
            raise ValueError(f"the evidence teacher was built for the menu {self.bits}, the env has {tuple(base.bits)}")
        budget = self.budget if self.budget is not None else base.config.bit_budget
        base.reset(options={"row": row})
        self.last_evidence = base.evidence_blocks()
        indices = plan_settings(self.bits, budget, base.block_spans(), self.last_evidence, base.config.sink_tokens,
                                self.evidence_setting)
        groups = int(getattr(base, "layer_groups", 1))
        return list(indices) if groups == 1 else [[i] * groups for i in indices]

"""What a task is to the env: items as prompt text, candidate continuations, the gold index.

lm-evaluation-harness's model of a multiple-choice task, cut down to what KVPrecision-v0 needs: the
env asks a task for its items (each with an integer ``row``, the id that ``reset(options={"row": r})``,
episode sets and the reference store use), for the context of an item with its shots, and for the
candidate continuations; it tokenizes, scores and chooses the same way for every task. Tasks are
plug-ins (``register_task``) chosen by name in the env config (``task: passkey``) with their
options (``task_options: {length: 1024}``), so a new task never touches the env.

Why items are plain objects with ``row``, ``endings`` and ``label``: the reward terms, episode sets
and splits read exactly those, and HellaSwag's items already have them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from envs.hellaswag import HellaSwagItem, Splits, sample_shots, split_items
from envs.scoring import TARGET_DELIMITER, choose
from quant.registry import Registry

__all__ = ["TaskItem", "Task", "TASKS", "register_task", "make_task", "task_names"]


class TaskItem(Protocol):
    """What every task's item has (more fields are the task's own business)."""

    row: int  # stable integer id: reset(options={"row": row}), episode sets, records
    endings: tuple[str, ...]  # candidate continuations, without the delimiter
    label: int  # index of the gold candidate


class Task:
    """A multiple-choice task (subclass and ``@register_task("name")``); the defaults are HellaSwag's.

    ``options`` are the task's own settings from the env config's ``task_options``; a subclass
    validates them in ``__init__`` and raises ``ValueError`` on a bad one.
    """

    name: str = ""
    #: whether :meth:`answer_text` is defined: the env can then decode the answer greedily
    #: (``KVPrecisionEnv.greedy_exact_match``) and ``experiments.evaluate`` records ``exact_match``
    exact_match: bool = False
    #: whether the env's ``shots`` solved examples go before each item
    uses_shots: bool = True

    def __init__(self, **options: Any):
        if options:
            raise ValueError(f"task {self.name!r} takes no options, got {sorted(options)}")

    def load(self, source: Sequence[HellaSwagItem], tokenizer, max_positions: int) -> list[TaskItem]:
        """Every item of the task. ``source``: the HellaSwag records the env loaded (the task's data,
        or the text a generated task draws from); ``max_positions``: the model's context length."""
        raise NotImplementedError

    def split(self, items: Sequence[TaskItem], eval_size: int, seed: int) -> Splits:
        """Disjoint pool (shots, training) and held-out items, fixed by ``seed``."""
        return split_items(items, eval_size, seed=seed)

    def shots(self, item: TaskItem, pool: Sequence[TaskItem], k: int, rng: np.random.Generator) -> list[TaskItem]:
        """The solved examples shown before ``item`` (never ``item`` itself)."""
        return sample_shots(pool, k, rng, exclude_row=item.row) if self.uses_shots else []

    def context(self, item: TaskItem, shots: Sequence[TaskItem]) -> str:
        """The prompt text the candidates continue."""
        raise NotImplementedError

    def continuations(self, item: TaskItem) -> list[str]:
        """Candidate continuations as scored: lm-eval's target delimiter + each ending."""
        return [TARGET_DELIMITER + e for e in item.endings]

    def choose(self, item: TaskItem, scores: Sequence[float]) -> tuple[int, int]:
        """``(pred, pred_norm)``: argmax of log-likelihood and of it per candidate character (lm-eval's
        acc_norm); a task normalising otherwise overrides this."""
        return choose(scores, item.endings)

    def evidence(self, item: TaskItem) -> list[str]:
        """Substrings of the item's prompt (its :meth:`context`) that carry the answer; default: none.

        Why: a generated task knows where it put the answer, so a privileged teacher
        (``agents.evidence``) can keep exactly those tokens precise on pool items and a learned
        controller can imitate it from observable features ("learning by cheating"). Each string
        must occur in the context; ``KVPrecisionEnv.evidence_blocks`` maps them to blocks. Tasks whose
        answer is spread over the whole prompt (HellaSwag) have none."""
        return []

    def answer_text(self, item: TaskItem) -> str:
        """The text greedy decoding must produce for an exact match (tasks with ``exact_match``)."""
        raise NotImplementedError(f"task {self.name!r} defines no exact match")


TASKS: Registry[type[Task]] = Registry("task", entry_point_group="kvgym.tasks")
register_task = TASKS.register


def make_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task registered as ``name`` built with ``options`` (unknown name: an error listing the known)."""
    if not isinstance(options, (Mapping, type(None))):
        raise ValueError(f"task_options must be a mapping of option -> value, got {options!r}")
    return TASKS.get(name)(**dict(options or {}))


def task_names() -> list[str]:
    return TASKS.names()

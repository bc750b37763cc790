"""HellaSwag as a task: k-shot prompts in lm-eval's layout, four endings, acc_norm by characters.

The loading, cleaning, split and shot sampling stay in ``envs.hellaswag``; this class only says how
the env asks for them, so HellaSwag through the task interface builds exactly the old prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from envs.hellaswag import HellaSwagItem, build_prompt
from envs.tasks.base import Task, register_task

__all__ = ["HellaSwagTask"]


@register_task("hellaswag")
class HellaSwagTask(Task):
    def load(self, source: Sequence[HellaSwagItem], tokenizer, max_positions: int) -> list[HellaSwagItem]:
        return list(source)

    def context(self, item: HellaSwagItem, shots: Sequence[HellaSwagItem]) -> str:
        return build_prompt(item, shots)

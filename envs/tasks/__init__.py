"""Tasks as data: what an episode asks the model (``envs.tasks.base``), one registry of them.

Built in: ``hellaswag`` (k-shot HellaSwag, lm-eval's prompts and scoring; the default) and
``passkey`` (a generated pass-key retrieval task). Importing this package registers both.
"""

from envs.tasks import hellaswag as _hellaswag  # noqa: F401  (registers "hellaswag")
from envs.tasks import passkey as _passkey  # noqa: F401  (registers "passkey")
from envs.tasks.base import TASKS, Task, TaskItem, make_task, register_task, task_names

__all__ = ["TASKS", "Task", "TaskItem", "make_task", "register_task", "task_names"]

"""Tasks as data: the registry, choosing a task by name, HellaSwag through the task interface."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from _tiny_env import ITEMS, expected_inputs, make_env

from envs.hellaswag import build_prompt, item_rng, sample_shots
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.scoring import choose, score_requests
from envs.tasks import TASKS, Task, make_task, register_task, task_names
from envs.tasks.hellaswag import HellaSwagTask


def test_builtin_tasks_are_registered():
    assert {"hellaswag", "passkey"} <= set(task_names())
    assert EnvConfig().task == "hellaswag" and EnvConfig().task_options == {}
    assert isinstance(make_task("hellaswag"), HellaSwagTask)


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'hellaswog'; known: .*hellaswag.*passkey"):
        EnvConfig(task="hellaswog").validate()
    path = tmp_path / "env.yaml"
    path.write_text("task: passkey\ntask_options: {length: 700, depth: [0.1, 0.9], keys: 2}\n")
    cfg = EnvConfig.from_yaml(path)
    assert (cfg.task, cfg.task_options) == ("passkey", {"length": 700, "depth": [0.1, 0.9], "keys": 2})
    cfg.validate()
    with pytest.raises(ValueError, match="takes no options"):
        EnvConfig(task_options={"length": 5}).validate()
    with pytest.raises(ValueError, match="task_options must be a mapping"):
        make_task("passkey", [("length", 5)])


def test_hellaswag_task_builds_the_old_prompts():
    task = make_task("hellaswag")
    pool = list(ITEMS[2:])
    item = ITEMS[0]
    shots = task.shots(item, pool, 3, item_rng(0, item.row))
    assert shots == sample_shots(pool, 3, item_rng(0, item.row), exclude_row=item.row)
    assert task.context(item, shots) == build_prompt(item, shots)
    assert task.continuations(item) == [" " + e for e in item.endings]
    assert task.choose(item, [-9.0, -8.0, -7.5, -30.0]) == choose([-9.0, -8.0, -7.5, -30.0], item.endings)


def test_hellaswag_through_the_task_equals_the_old_path(tiny_model):
    """Prompt ids, ending ids and the full-precision ending scores of the env (now through the task)
    equal what the pre-task code computed from envs.hellaswag's pieces (the fp16 evaluator's path)."""
    env = make_env(tiny_model)
    model, _ = tiny_model
    for row in [it.row for it in env.items] + [env.pool[0].row]:
        prompt_ids, endings = expected_inputs(env, row)
        item, env_prompt, env_endings = env.episode_inputs(row)
        assert (env_prompt, env_endings) == (prompt_ids, endings)
        scores = score_requests(model, [(prompt_ids, e) for e in endings])
        reference = env.reference_for(row)
        np.testing.assert_allclose(reference.ending_scores, scores, atol=1e-4)
        assert (reference.pred, reference.pred_norm) == choose(scores, item.endings)
    with pytest.raises(ValueError, match="defines no exact match"):
        env.reset(options={"row": env.items[0].row})
        env.greedy_exact_match()


@dataclass(frozen=True)
class _Echo:
    row: int
    endings: tuple[str, ...]
    label: int


def test_a_registered_task_runs_in_the_env_without_touching_it(tiny_model):
    @register_task("test-echo")
    class EchoTask(Task):
        """Repeat a word: a task defined entirely outside the env."""

        uses_shots = False

        def load(self, source, tokenizer, max_positions):
            return [_Echo(row=r, endings=("yes", "no"), label=r % 2) for r in range(6)]

        def context(self, item, shots):
            return f"Item {item.row}: say {item.endings[item.label]}. Answer:"

    try:
        model, tokenizer = tiny_model
        env = KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=ITEMS, model="tiny-random-llama", task="test-echo",
                             eval_size=2, split="eval", interval=8, group_size=8)
        assert sorted(it.row for it in env.items + env.pool) == list(range(6))
        _, info = env.reset(options={"row": env.items[0].row})
        assert info["shots"] == 0
        done = False
        while not done:
            _, _, done, _, info = env.step(0)
        assert info["gold"] == env.items[0].label and len(info["scores"]) == 2
    finally:
        TASKS.unregister("test-echo")

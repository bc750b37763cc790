"""experiments.collect with planning teachers on the tiny model and the passkey task: the evidence teacher's
labels, resume, and the end-to-end "learning by cheating" path (collect -> train_mlp -> mlp:<path> under a budget)."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest

from agents import make_policy
from agents.rollout import rollout
from envs import ENV_ID
from envs.kv_precision import EnvConfig
from envs.settings import setting_name
from experiments import collect, train_mlp

BUDGET = 3.0
PASSKEY = EnvConfig(model="tiny-random-llama", task="passkey", interval=32, group_size=32, eval_size=4,
                    bit_budget=BUDGET, task_options={"length": 320, "items": 12, "depth": [0.0, 1.0], "keys": 1})


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _episodes(header, rows) -> list[tuple[int, list[str]]]:
    """(row, labels) per episode, in order."""
    out: list[tuple[int, list[str]]] = []
    for r in rows:
        if r[1] == "0":
            out.append((int(r[0]), []))
        out[-1][1].append(r[header.index("bits")])
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect_evidence")
    cfg = collect.CollectConfig(env=PASSKEY, policy="evidence", episodes=2, threads=1, out_dir=str(out),
                                progress=False)
    return cfg, collect.run(cfg)


def test_collect_labels_are_the_teachers_plans_on_permuted_pool_rows(collected):
    cfg, paths = collected
    header, rows = _read_csv(paths["csv"])
    episodes = _episodes(header, rows)
    env = gym.make(ENV_ID, config=cfg.env)
    order = collect.teacher_rows(env, cfg.seed)
    pool = {item.row for item in env.unwrapped.items}
    held_out = env.unwrapped.sibling(split="eval")
    assert sorted(order) == sorted(pool) and set(order).isdisjoint(it.row for it in held_out.items)
    held_out.close()
    assert [row for row, _ in episodes] == order[:2]
    teacher = make_policy("evidence", env=env)
    for row, labels in episodes:
        plan = teacher.plan(env, row)
        assert labels == [setting_name(env.unwrapped.bits[a]) for a in plan]
        assert len(set(labels)) > 1  # the needle's blocks stand out
    env.close()


def test_collect_with_a_teacher_resumes(collected):
    cfg, paths = collected
    header, before = _read_csv(paths["csv"])
    more = collect.CollectConfig(**{**vars(cfg), "episodes": 3, "resume": True})
    _, after = _read_csv(collect.run(more)["csv"])
    assert after[: len(before)] == before
    env = gym.make(ENV_ID, config=cfg.env)
    assert [row for row, _ in _episodes(header, after)] == collect.teacher_rows(env, cfg.seed)[:3]
    env.close()
    with pytest.raises(ValueError, match="cannot resume"):
        collect.run(collect.CollectConfig(**{**vars(more), "policy": "evidence:8"}))


def test_run_episode_needs_a_row_only_for_planners(tmp_path):
    env = gym.make(ENV_ID, config=PASSKEY)
    with pytest.raises(ValueError, match="needs the row"):
        collect.run_episode(env, make_policy("evidence", env=env), 0)
    with pytest.raises(ValueError, match="only for planning"):
        collect.run_episode(env, make_policy("fixed:2", env=env), 0, row=env.unwrapped.items[0].row)
    env.close()


def test_teacher_data_trains_an_mlp_that_runs_under_the_budget(collected, tmp_path):
    _, paths = collected
    out = train_mlp.run(train_mlp.TrainMLPConfig(csv=str(paths["csv"]), bits=PASSKEY.bits, epochs=3,
                                                 out_dir=str(tmp_path / "mlp"), progress=False))
    env = gym.make(ENV_ID, config=EnvConfig(**{**vars(PASSKEY), "split": "eval"}))
    mlp = make_policy(f"mlp:{out['model']}", env=env)
    for item in env.unwrapped.items[:2]:
        info = rollout(env, mlp, options={"row": item.row}).final_info
        assert info["avg_bits"] <= BUDGET and np.isfinite(info["loglik_delta"])
    env.close()


def test_collect_with_the_oracle_as_teacher(tmp_path):
    env_cfg = EnvConfig(model="tiny-random-llama", shots=0, interval=32, group_size=32, bit_budget=4.0)
    cfg = collect.CollectConfig(env=env_cfg, policy="oracle", episodes=1, threads=1, out_dir=str(tmp_path),
                                progress=False)
    header, rows = _read_csv(collect.run(cfg)["csv"])
    ((row, labels),) = _episodes(header, rows)
    env = gym.make(ENV_ID, config=env_cfg)
    assert row == collect.teacher_rows(env, 0)[0]
    plan = make_policy("oracle", env=env).plan(env, row)
    assert labels == [setting_name(env.unwrapped.bits[a]) for a in plan]
    env.close()

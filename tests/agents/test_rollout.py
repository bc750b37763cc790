"""agents.rollout on the tiny env: what an episode records, schedules, callbacks, and no deprecated calls."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
from _tiny_env import make_env  # noqa: E402

from agents.fixed import FixedBitsPolicy  # noqa: E402
from agents.rollout import Episode, Schedule, rollout  # noqa: E402


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model)
    yield e
    e.close()


def test_episode_records_every_step_as_a_hand_written_loop_sees_it(env):
    row = env.pool[0].row
    policy = FixedBitsPolicy(env.observation_names, env.bits, 4)
    episode = rollout(env, policy, options={"row": row})
    obs, info = env.reset(options={"row": row})
    seen, steps = [obs], []
    done = False
    while not done:
        obs, reward, done, _, step_info = env.step(env.bits.index(4))
        seen.append(obs)
        steps.append((reward, step_info))
    assert episode.reset_info == info and len(episode) == info["blocks"] == len(steps)
    assert all(np.array_equal(a, b) for a, b in zip(episode.observations, seen[:-1], strict=True))
    assert np.array_equal(episode.final_observation, seen[-1])
    assert episode.actions == [env.bits.index(4)] * len(steps)
    assert episode.rewards == [r for r, _ in steps] and episode.total_reward == pytest.approx(sum(episode.rewards))
    assert episode.final_info["scores"] == steps[-1][1]["scores"]
    assert episode.terminated and not episode.truncated and episode.done
    assert len(episode.timings) == len(episode.wall_ms) == len(steps) + 1
    assert "reference_ms" in episode.timings[0] and all("step_ms" in t for t in episode.timings[1:])
    assert 0 < episode.ms < 1000 * 60


def test_schedule_plays_its_actions_from_each_episode_start(env):
    row = env.pool[1].row
    blocks = env.reset(options={"row": row})[1]["blocks"]
    actions = [i % len(env.bits) for i in range(blocks)]
    schedule = Schedule(actions)
    for _ in range(2):  # episode_start rewinds it
        episode = rollout(env, schedule, options={"row": row})
        assert episode.actions == actions
        assert [i["bits"] for i in episode.infos] == [env.bits[a] for a in actions]
    with pytest.raises(ValueError, match="schedule has 1"):
        rollout(env, Schedule([0]), options={"row": row})


def test_callback_runs_after_reset_and_every_step_outside_the_timing(env):
    calls = []

    def callback(episode: Episode) -> None:
        calls.append((len(episode), episode.done))

    episode = rollout(env, Schedule([1] * 50), seed=3, callback=callback)
    assert calls == [(i, i == len(episode)) for i in range(len(episode) + 1)]


def test_an_episode_and_a_generation_raise_no_deprecation_warning(env, tiny_model, tmp_path):
    """Our own model calls pass the cache as the installed transformers wants it (no FutureWarning)."""
    from experiments.generate import GenerateConfig, generate_one

    model, tokenizer = tiny_model
    cfg = GenerateConfig(env=env.config, max_new_tokens=20, prompts=("Hello there",), out_dir=str(tmp_path))
    policy = FixedBitsPolicy(env.observation_names, env.bits, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rollout(env, policy, options={"row": env.pool[0].row})
        record = generate_one(model, tokenizer, policy, "Hello there", cfg)
        quanto = env.sibling(cache="quanto", bits=(4,))
        rollout(quanto, FixedBitsPolicy(quanto.observation_names, quanto.bits, 4), options={"row": env.pool[0].row})
    assert record["new_tokens"] == 20 and record["block_bits"]  # the cache really drove the generation

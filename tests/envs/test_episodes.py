"""Named episode sets: built deterministically from their name, drawn by reset() without a row."""

from __future__ import annotations

import pytest
from _tiny_env import make_env

from envs.episodes import EpisodeSet, episode_set, parse_episode_set


def test_names_parse_and_bad_names_are_clear_errors():
    parsed = parse_episode_set("train-3-5")
    assert (parsed.split, parsed.seed, parsed.size) == ("train", 3, 5)
    parsed = parse_episode_set("eval-2")
    assert (parsed.split, parsed.seed, parsed.size) == ("eval", None, 2)
    for bad in ("train-5", "eval-1-2", "test-3", "train-0-0", "eval-x"):
        with pytest.raises(ValueError, match="episode set"):
            parse_episode_set(bad)


def test_sets_are_deterministic_distinct_and_independent_of_item_order(tiny_model):
    env = make_env(tiny_model)
    a = episode_set("train-7-6", env.pool)
    assert a == episode_set("train-7-6", list(reversed(env.pool)))
    assert isinstance(a, EpisodeSet) and a.split == "train" and len(set(a.rows)) == 6
    assert set(a.rows) <= {item.row for item in env.pool}
    assert episode_set("train-8-6", env.pool).rows != a.rows  # the seed matters
    assert episode_set("eval-2", env.items).rows == tuple(item.row for item in env.items[:2])
    with pytest.raises(ValueError, match="asks for 99"):
        episode_set("train-0-99", env.pool)


def test_reset_without_a_row_draws_only_episodes_of_the_set_with_their_fixed_shots(tiny_model):
    env = make_env(tiny_model, episodes="train-1-3")
    assert env.episodes.rows == episode_set("train-1-3", env.pool).rows
    seen = set()
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        seen.add(info["row"])
        again, _ = env.reset(options={"row": info["row"]})  # the same episode: same prompt and shots
        assert (obs == again).all()
    assert seen == set(env.episodes.rows)
    evaluation = make_env(tiny_model, split="eval", episodes="eval-2")
    assert {evaluation.reset(seed=s)[1]["row"] for s in range(8)} <= {it.row for it in evaluation.items[:2]}


def test_an_episode_set_of_the_other_split_is_refused(tiny_model):
    with pytest.raises(ValueError, match="not from the env's split 'train'"):
        make_env(tiny_model, episodes="eval-2")

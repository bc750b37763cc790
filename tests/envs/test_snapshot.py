"""KVPrecisionEnv.snapshot()/restore(): continuing from a restored snapshot is bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_env import ITEMS, make_env

from envs.rewards import RewardTerm

ROW = ITEMS[5].row


class _StepCounter(RewardTerm):
    """A term with per-episode state: the snapshot must carry it."""

    def reset(self, step) -> None:
        self.steps = 0

    def __call__(self, step) -> float:
        self.steps += 1
        return float(self.steps)


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model, rewards={"loglik": 1.0, "memory": 0.5})
    e.reward_fn.terms["_test_step_counter"] = (1.0, _StepCounter())  # not registered: no global side effect
    yield e
    e.close()


def _continue(env, actions):
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs, reward, terminated, info))
        if terminated:
            break
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for (obs_a, r_a, t_a, info_a), (obs_b, r_b, t_b, info_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b and t_a == t_b
        assert info_a == info_b


def test_restored_snapshot_continues_bit_identically(env):
    obs, info = env.reset(options={"row": ROW})
    blocks = info["blocks"]
    assert blocks >= 3
    env.step(1)
    snap = env.snapshot()
    tail = [0, 2, 3, 1, 0, 2, 3, 1][: blocks]
    original = _continue(env, tail)
    assert original[-1][2]  # the episode ended
    # something else in between: another branch, then a whole other episode
    env.restore(snap)
    _continue(env, [3] * blocks)
    env.reset(options={"row": ITEMS[6].row})
    env.step(0)
    env.restore(snap)  # the same snapshot, restored twice
    _same(_continue(env, tail), original)
    assert original[-1][3]["rewards"]["_test_step_counter"] == blocks  # the term's count came along


def test_snapshot_is_not_changed_by_the_continuation(env):
    env.reset(options={"row": ROW})
    snap = env.snapshot()
    committed = snap.episode.cache.committed_length
    _continue(env, [0] * 20)
    assert snap.episode.cache.committed_length == committed
    assert not snap.episode.done


def test_snapshot_errors(env, tiny_model):
    fresh = make_env(tiny_model)
    with pytest.raises(RuntimeError, match="before reset"):
        fresh.snapshot()
    fresh.reset(options={"row": ROW})
    with pytest.raises(ValueError, match="another env"):
        env.restore(fresh.snapshot())
    with pytest.raises(TypeError, match="snapshot"):
        env.restore({"episode": None})
    fresh.close()
    quanto = make_env(tiny_model, cache="quanto", bits=(4,))
    quanto.reset(options={"row": ROW})
    with pytest.raises(ValueError, match="quanto"):
        quanto.snapshot()
    quanto.close()


@pytest.mark.parametrize("overrides", [{"cache": "dynamic", "bits": (16,)}, {"sink_tokens": 4, "bits": (2, 4)},
                                       {"features": ("entropy", "kv_error", "saliency", "progress")}])
def test_snapshot_with_other_caches_sinks_and_features(tiny_model, overrides):
    env = make_env(tiny_model, **overrides)
    env.reset(options={"row": ROW})
    env.step(0)
    snap = env.snapshot()
    original = _continue(env, [env.action_space.n - 1, 0] * 10)
    env.restore(snap)
    _same(_continue(env, [env.action_space.n - 1, 0] * 10), original)
    env.close()


def test_snapshot_with_layer_groups(tiny_model):
    env = make_env(tiny_model, layer_groups=2)
    env.reset(options={"row": ROW})
    env.step([0, 3])
    snap = env.snapshot()
    original = _continue(env, [[1, 2], [3, 0], [2, 2], [0, 1], [1, 1], [3, 3]] * 2)
    env.restore(snap)
    _same(_continue(env, [[1, 2], [3, 0], [2, 2], [0, 1], [1, 1], [3, 3]] * 2), original)
    env.close()

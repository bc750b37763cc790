"""``EnvConfig.rotate_keys`` / ``rotate_values`` on the tiny model: the env's episode cache stores rotated keys, which changes a
quantized episode and nothing at 16 bits; marks and sinks work with it;
bad combinations are clear errors. (The baseline pass and its store key:
tests/envs/test_baseline_reward.py; the batched vector env: tests/envs/test_vector.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from _passkey_source import SOURCE
from _tiny_env import ITEMS, make_env

from envs.kv_precision import EnvConfig, KVPrecisionEnv

ROWS = [ITEMS[0].row, ITEMS[5].row]
MENU = (2, (4, 2), 16)


def _final(env, row: int, action) -> dict:
    env.reset(options={"row": row})
    while True:
        _, _, terminated, _, info = env.step(action)
        if terminated:
            return info


@pytest.mark.parametrize("keys,values", [(True, False), (False, True)], ids=["keys", "values"])
def test_the_episode_cache_rotates_and_only_quantized_episodes_change(tiny_model, keys, values):
    plain = make_env(tiny_model, bits=MENU, sink_tokens=2)
    rotated = make_env(tiny_model, bits=MENU, sink_tokens=2, rotate_keys=keys, rotate_values=values)
    cache = rotated._new_cache()
    assert (cache.rotate_keys, cache.rotate_values) == (keys, values)
    assert not (plain._new_cache().rotate_keys or plain._new_cache().rotate_values)
    for row in ROWS:
        full_p, full_r = _final(plain, row, MENU.index(16)), _final(rotated, row, MENU.index(16))
        assert full_p["scores"] == full_r["scores"]
        low_p, low_r = _final(plain, row, 0), _final(rotated, row, 0)
        assert low_p["scores"] != low_r["scores"]
        for key in ("avg_bits", "kv_bytes", "fp16_kv_bytes"):  # rotation costs nothing stored
            assert low_p[key] == low_r[key]


def test_marks_and_sinks_with_rotation(tiny_model):
    """Per-token marks at 16 bits on a rotated 2-bit block: a run of its own, stored unrotated."""
    model, tokenizer = tiny_model
    env = KVPrecisionEnv(
        lm=model, tokenizer=tokenizer, items=SOURCE, model="tiny-random-llama", task="passkey", interval=64,
        group_size=32, eval_size=4, split="eval", task_options={"length": 640, "items": 12, "keys": 1},
        bits=[2, 4], protect_bits=16, token_features=["digits"], sink_tokens=4, rotate_keys=True,
    )
    action = np.zeros(65, dtype=np.int64)
    action[1 + 10 : 1 + 20] = 1
    env.reset(options={"row": env.items[0].row})
    env.step(action)
    layer = env._episode.cache.layers[0]
    assert [(s.key_bits, s.key_rotation is not None) for s in layer.segments] == [
        (16, False), (2, True), (16, False), (2, True)
    ]
    assert env._episode.cache.blocks[0].protected_tokens == 10
    env.close()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rotate_keys": "yes"}, "rotate_keys must be true or false"),
    ({"rotate_keys": True, "cache": "quanto", "bits": [4]}, "rotate_keys needs cache: mixed"),
    ({"rotate_keys": True, "cache": "dynamic", "bits": [16]}, "rotate_keys needs cache: mixed"),
    ({"rotate_values": 1}, "rotate_values must be true or false"),
    ({"rotate_values": True, "cache": "quanto", "bits": [4]}, "rotate_values needs cache: mixed"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig.from_dict({"model": "tiny-random-llama", **overrides}).validate()

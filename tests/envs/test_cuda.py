"""The env on a GPU: runs where CUDA is visible, skipped elsewhere (run it whenever a GPU is lent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG

from envs.kv_precision import KVPrecisionEnv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a visible CUDA device")

MENU = dict(bits=(2, (4, 2), 8, 16), sink_tokens=4)


def _episode(env: KVPrecisionEnv, row: int, actions: list[int]) -> dict:
    env.reset(options={"row": row})
    done, t = False, 0
    while not done:
        obs, _, done, _, info = env.step(actions[t % len(actions)])
        assert np.isfinite(obs).all()
        t += 1
    return info


@pytest.fixture(scope="module")
def cuda_env(tmp_path_factory):
    env = KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, **MENU, reference_store=str(tmp_path_factory.mktemp("refs")))
    yield env
    env.close()


def test_auto_is_cuda_in_bfloat16(cuda_env):
    assert cuda_env.model.device.type == "cuda" and cuda_env.model.dtype == torch.bfloat16


def test_mixed_episode_with_pairs_and_sinks_counts_the_same_bytes_as_on_the_cpu(cuda_env):
    cpu = KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, **MENU, device="cpu", dtype="bfloat16", reference_store=False)
    row = cuda_env.pool[0].row
    actions = [1, 0, 2, 3]
    on_gpu, on_cpu = _episode(cuda_env, row, actions), _episode(cpu, row, actions)
    for key in ("kv_bytes", "fp16_kv_bytes", "avg_bits", "key_bits", "value_bits", "tokens"):
        assert on_gpu[key] == on_cpu[key], key
    assert np.isfinite(on_gpu["scores"]).all()
    assert cuda_env._episode.reference.target_logprobs.device.type == "cuda"


def test_full_precision_policy_agrees_with_the_reference(cuda_env):
    for item in cuda_env.pool[:3]:
        info = _episode(cuda_env, item.row, [cuda_env.bits.index(16)])
        ref = cuda_env.reference_for(item.row)
        assert info["avg_bits"] == 16.0 and info["kv_bytes"] == info["fp16_kv_bytes"]
        assert abs(info["loglik_delta"]) < 0.05  # bf16: the committed cache rounds through fp16 storage
        assert info["scores"] == pytest.approx(ref.ending_scores.tolist(), abs=0.05)


def test_stored_cuda_reference_is_keyed_by_device_and_equals_a_fresh_pass(cuda_env):
    row = cuda_env.pool[1].row
    stored = cuda_env.reference_for(row)
    _, prompt, endings = cuda_env.episode_inputs(row)
    assert cuda_env._store_key(prompt, endings).device == "cuda"
    fresh = cuda_env._compute_reference(prompt, endings, cuda_env._rows[row])
    assert torch.equal(stored.target_logprobs, fresh.target_logprobs)
    assert np.array_equal(stored.ending_scores, fresh.ending_scores)


def test_quanto_baseline_runs_on_the_gpu(cuda_env):
    quanto = cuda_env.sibling(cache="quanto", bits=(4,), sink_tokens=0)
    info = _episode(quanto, cuda_env.pool[0].row, [0])
    assert np.isfinite(info["scores"]).all() and 0 < info["kv_bytes"]


def test_rotated_cache_runs_in_bfloat16_on_the_gpu(cuda_env):
    """Rotated keys and values: the rotation lives on the GPU (quant.rotation keeps one copy per device), the
    episode's bytes equal the unrotated env's and its scores stay finite."""
    rotated = cuda_env.sibling(rotate_keys=True, rotate_values=True)
    row = cuda_env.pool[0].row
    plain, turned = _episode(cuda_env, row, [0, 1]), _episode(rotated, row, [0, 1])
    assert turned["kv_bytes"] == plain["kv_bytes"] and np.isfinite(turned["scores"]).all()
    layer = rotated._episode.cache.layers[0]
    assert any(s.key_rotation is not None and s.key_rotation.device.type == "cuda" for s in layer.segments)


def test_batched_vector_env_on_the_gpu_agrees_with_the_single_env(cuda_env):
    """The batched env's rows live on the GPU too: at all-16 each row's predictions are the single env's and its
    scores agree to bf16 precision; a quantized step runs (finite scores). On the GPU the rows that end
    together score their endings in one forward by default (``batch_scoring``)."""
    import gymnasium as gym

    import envs

    vec = gym.make_vec(envs.ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", items=ITEMS,
                       **TINY_CONFIG, **MENU, reference_store=False)
    assert vec.batch_scoring
    rows = [item.row for item in cuda_env.items[:3]]
    for action in (cuda_env.bits.index(16), cuda_env.bits.index((4, 2))):
        vec.reset(options={"rows": rows})
        ends: dict[int, dict] = {}
        while len(ends) < len(rows):
            _, _, term, _, info = vec.step(np.full(3, action))
            for i in np.flatnonzero(term):
                ends.setdefault(int(info["row"][i]), {k: info[k][i] for k in ("scores", "pred", "pred_norm")})
        for row in rows:
            single = _episode(cuda_env, row, [action])
            assert np.isfinite(ends[row]["scores"]).all()
            if action == cuda_env.bits.index(16):
                np.testing.assert_allclose(ends[row]["scores"], single["scores"], atol=0.05)
                assert ends[row]["pred_norm"] == single["pred_norm"]
    vec.close()


def test_mixed_bit_generation_runs_on_the_gpu(cuda_env, tmp_path):
    """``generate`` with a mixed-bit cache on the GPU: the requested tokens are decoded, blocks committed at the
    policy's bits."""
    from agents.fixed import FixedBitsPolicy
    from experiments.generate import GenerateConfig, generate_one

    cfg = GenerateConfig(env=cuda_env.config, max_new_tokens=24, min_new_tokens=24, prompts=("Hello there",),
                         out_dir=str(tmp_path), progress=False)
    policy = FixedBitsPolicy(cuda_env.observation_names, cuda_env.bits, (4, 2))
    record = generate_one(cuda_env.model, cuda_env.tokenizer, policy, "Hello there", cfg)
    assert record["new_tokens"] == 24 and record["block_bits"] and record["committed_kv_ratio"] < 1

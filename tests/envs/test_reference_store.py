"""The on-disk reference store: entries equal fresh passes bit for bit, bad entries are never used,
concurrent writers leave one valid entry, and a new process loads instead of computing."""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import replace

import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG, make_env

from envs.kv_precision import KVPrecisionEnv
from envs.reference_store import ReferenceKey, ReferenceStore, model_digest, tokens_digest


@pytest.fixture
def counted(monkeypatch):
    """Counts full-precision reference passes (forwards of a whole prompt) in this process."""
    calls = []
    original = KVPrecisionEnv._compute_reference

    def compute(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KVPrecisionEnv, "_compute_reference", compute)
    return calls


def _entry(env: KVPrecisionEnv, row: int):
    _, prompt, endings = env.episode_inputs(row)
    key = env._store_key(prompt, endings)
    return key, env.reference_store.path(key)


def _assert_same(a, b) -> None:
    assert torch.equal(a.target_logprobs.cpu(), b.target_logprobs.cpu())
    assert a.target_logprobs.dtype == b.target_logprobs.dtype
    assert np.array_equal(a.ending_scores, b.ending_scores) and a.ending_scores.dtype == b.ending_scores.dtype
    assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm)


def test_stored_reference_equals_fresh_pass_and_is_loaded_not_computed(tiny_model, tmp_path, counted):
    row = ITEMS[0].row
    fresh = make_env(tiny_model, reference_store=False).reference_for(row)
    assert len(counted) == 1
    writer = make_env(tiny_model, reference_store=str(tmp_path))
    _assert_same(writer.reference_for(row), fresh)
    assert len(counted) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    reader = make_env(tiny_model, reference_store=str(tmp_path))  # a new env: empty in-memory cache
    _assert_same(reader.reference_for(row), fresh)
    assert len(counted) == 2  # loaded from disk
    # whole episodes agree too: the rewards read the loaded reference
    infos = []
    for env in (make_env(tiny_model, reference_store=False), reader):
        env.reset(options={"row": row})
        done = False
        while not done:
            *_, done, _, info = env.step(0)
        infos.append(info)
    assert infos[0] == infos[1]


def test_key_separates_models_tokens_and_fingerprints(tiny_model, tmp_path):
    from _tiny_env import tiny_model_with_layers

    env = make_env(tiny_model, reference_store=str(tmp_path))
    key, _ = _entry(env, ITEMS[0].row)
    other_key, _ = _entry(env, ITEMS[1].row)
    assert key.tokens != other_key.tokens and key.digest() != other_key.digest()
    assert model_digest(tiny_model_with_layers(4)[0]) != model_digest(tiny_model[0])
    assert tokens_digest([1, 2], [[3]]) != tokens_digest([1], [[2, 3]])  # boundaries count
    assert replace(key, fingerprint="other").digest() != key.digest()


@pytest.mark.parametrize("damage", ["truncated", "garbled", "foreign", "empty"])
def test_bad_entry_is_detected_recomputed_and_rewritten(tiny_model, tmp_path, counted, damage):
    row = ITEMS[0].row
    fresh = make_env(tiny_model, reference_store=False).reference_for(row)
    env = make_env(tiny_model, reference_store=str(tmp_path))
    key, path = _entry(env, row)
    env.reference_for(row)
    good, stored = path.read_bytes(), env.reference_store.load(key)
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbled":  # the header parses, the tensor bytes do not match the checksum
        path.write_bytes(good[:-8] + bytes(b ^ 0xFF for b in good[-8:]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a whole, valid entry of another key (another fingerprint) under this key's name
        foreign = replace(key, fingerprint="another-machine")
        store = ReferenceStore(tmp_path)
        store.save(foreign, {"target_logprobs": torch.zeros(3), "ending_scores": torch.zeros(4, dtype=torch.float64),
                             "preds": torch.zeros(2, dtype=torch.int64)})
        store.path(foreign).replace(path)
    assert env.reference_store.load(key) is None
    before = len(counted)
    _assert_same(make_env(tiny_model, reference_store=str(tmp_path)).reference_for(row), fresh)
    assert len(counted) == before + 1  # recomputed, never used
    rewritten = env.reference_store.load(key)  # rewritten whole
    assert rewritten is not None and all(torch.equal(rewritten[k], stored[k]) for k in stored)


def test_header_holds_the_key_and_a_checksum(tiny_model, tmp_path):
    from safetensors import safe_open

    env = make_env(tiny_model, reference_store=str(tmp_path))
    key, path = _entry(env, ITEMS[0].row)
    env.reference_for(ITEMS[0].row)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["key"])["tokens"] == key.tokens and len(meta["checksum"]) == 64
    assert isinstance(ReferenceKey(**json.loads(meta["key"])), ReferenceKey)


def _reference_in_new_process(store: str, row: int, queue) -> None:
    """Child process: build a tiny env on the store, get one reference, report passes and result."""
    import envs.kv_precision as kvp

    calls = []
    original = kvp.KVPrecisionEnv._compute_reference
    kvp.KVPrecisionEnv._compute_reference = lambda self, *a: calls.append(1) or original(self, *a)
    env = kvp.KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, reference_store=store)
    ref = env.reference_for(row)
    queue.put((len(calls), ref.target_logprobs.tolist(), ref.ending_scores.tolist()))


def test_concurrent_writers_leave_one_valid_entry_and_a_new_process_loads_it(tiny_model, tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    row = ITEMS[2].row
    writers = [ctx.Process(target=_reference_in_new_process, args=(str(tmp_path), row, queue)) for _ in range(2)]
    for p in writers:
        p.start()
    results = [queue.get(timeout=240) for _ in writers]
    for p in writers:
        p.join(timeout=60)
        assert p.exitcode == 0
    entries = list(tmp_path.glob("*.safetensors"))
    assert len(entries) == 1 and not list(tmp_path.glob(".*.tmp"))  # one entry, no temporary leftovers
    env = KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, reference_store=str(tmp_path))
    assert env.reference_store.load(_entry(env, row)[0]) is not None
    reader = ctx.Process(target=_reference_in_new_process, args=(str(tmp_path), row, queue))
    reader.start()
    computed, target_lp, scores = queue.get(timeout=240)
    reader.join(timeout=60)
    assert computed == 0  # loaded from the store, no reference pass
    fresh = KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, reference_store=False).reference_for(row)
    assert target_lp == fresh.target_logprobs.tolist() and scores == fresh.ending_scores.tolist()
    assert all(r[1:] == (target_lp, scores) for r in results)


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_reference_store_option_must_be_a_switch_or_a_folder(tiny_model, bad):
    with pytest.raises(ValueError, match="reference_store must be true, false or a folder"):
        make_env(tiny_model, reference_store=bad)

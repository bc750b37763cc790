"""The passkey task: deterministic generation, the key at its depth, distractors, env episodes,
greedy exact match, and clear errors on bad options."""

from __future__ import annotations

import pytest
from _passkey_source import SOURCE

from envs.hellaswag import HellaSwagItem
from envs.kv_precision import KVPrecisionEnv
from envs.tasks import make_task
from envs.tasks.passkey import NAMES, haystack_sentences

LENGTH = 640  # tokens (the tiny tokenizer is byte-level: ~15 filler sentences)
ENV = dict(model="tiny-random-llama", task="passkey", interval=64, group_size=32, eval_size=4, split="eval")


def _loaded(tiny_model, **options):
    task = make_task("passkey", {"length": LENGTH, "items": 24, "keys": 1, **options})
    items = task.load(SOURCE, tiny_model[1], max_positions=2048)
    return task, items


def _env(tiny_model, **options):
    model, tokenizer = tiny_model
    return KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=SOURCE,
                          **{**ENV, "task_options": {"length": LENGTH, "items": 12, "keys": 1, **options}})


def test_haystack_is_whole_digit_free_sentences():
    source = [*SOURCE, HellaSwagItem(99, "x", "He has 3 cats. Then he", ("a", "b"), 0)]
    sentences = haystack_sentences(source)
    assert len(sentences) == 64
    assert all(s[0].isupper() and s.endswith(".") and not any(c.isdigit() for c in s) for s in sentences)


def test_generator_is_deterministic(tiny_model):
    task_a, items_a = _loaded(tiny_model, seed=3, keys=2)
    task_b, items_b = _loaded(tiny_model, seed=3, keys=2)
    assert items_a == items_b
    tok = tiny_model[1]
    for a, b in zip(items_a, items_b, strict=True):
        assert tok.encode(task_a.context(a, [])) == tok.encode(task_b.context(b, []))
    _, other = _loaded(tiny_model, seed=4, keys=2)
    assert [it.key for it in other] != [it.key for it in items_a]
    assert [it.row for it in items_a] == list(range(24))


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0, [0.2, 0.6]])
def test_key_inside_prompt_at_depth(tiny_model, depth):
    task, items = _loaded(tiny_model, depth=depth)
    tok = tiny_model[1]
    lo, hi = (depth, depth) if isinstance(depth, float) else depth
    for item in items:
        prompt = task.prompt(item)
        assert lo <= item.depth <= hi
        assert item.key in prompt.sentences[prompt.needle_index]
        assert prompt.text.count(item.key) == 2  # the needle says it twice; the question never does
        filler_before = prompt.needle_index  # one key: every sentence before the needle is filler
        assert abs(filler_before - item.depth * prompt.filler) <= 1, (filler_before, item.depth, prompt.filler)
        n_tokens = len(tok.encode(prompt.text))
        assert LENGTH - 80 < n_tokens <= LENGTH  # filled to within about a sentence of the length
        assert prompt.text.endswith("The pass key is")


def test_several_keys_one_asked(tiny_model):
    task, items = _loaded(tiny_model, keys=3, depth=0.5)
    for item in items:
        prompt = task.prompt(item)
        names = [name for name, _, _ in item.needles]
        assert len(set(names)) == 3 and set(names) <= set(NAMES) and item.name in names
        assert len({key for _, key, _ in item.needles}) == 3
        assert all(key in prompt.text for _, key, _ in item.needles)
        assert prompt.text.endswith(f"The pass key of {item.name} is")
        assert f"The pass key of {item.name} is {item.key}." in prompt.sentences[prompt.needle_index]
        others = {key for name, key, _ in item.needles if name != item.name}
        assert others <= set(item.endings)  # the other named keys are distractors


@pytest.mark.parametrize("keys", [1, 3])
def test_near_distractors_change_one_digit(tiny_model, keys):
    _, items = _loaded(tiny_model, keys=keys, distractors="near", candidates=6)
    _, plain = _loaded(tiny_model, keys=keys)
    changed_positions = set()
    for item, same in zip(items, plain, strict=True):
        assert item.needles == same.needles and item.key == same.key  # only the distractors differ
        others = {key for name, key, _ in item.needles if name != item.name}
        for e in item.endings:
            if e == item.key or e in others:
                continue
            diff = [i for i in range(5) if e[i] != item.key[i]]
            assert len(diff) == 1 and e[0] != "0" and len(e) == 5 and e.isdigit()
            changed_positions.update(diff)
        assert len(set(item.endings)) == 6 and sum(e == item.key for e in item.endings) == 1
    assert changed_positions == set(range(5))


@pytest.mark.parametrize("keys", [1, 3])
def test_question_first_asks_before_the_haystack(tiny_model, keys):
    task, items = _loaded(tiny_model, keys=keys, question_first=True)
    plain, _ = _loaded(tiny_model, keys=keys)
    tok = tiny_model[1]
    for item in items[:6]:
        prompt = task.prompt(item)
        asked = "What is the pass key?" if keys == 1 else f"What is the pass key of {item.name}?"
        head, _, rest = prompt.text.partition("\n\n")  # the instruction, then the question, then the haystack
        assert rest.startswith(asked + "\n\n" + prompt.sentences[0])
        assert prompt.text.count(asked) == 2  # asked first and at the end
        assert len(tok.encode(prompt.text)) <= LENGTH
        assert prompt.filler <= plain.prompt(item).filler  # the question's tokens come out of the filler
        assert prompt.sentences[prompt.needle_index] == plain.prompt(item).sentences[plain.prompt(item).needle_index]


@pytest.mark.parametrize("options", [{}, {"keys": 4, "candidates": 3}, {"candidates": 6}])
def test_distractors_never_equal_the_key(tiny_model, options):
    _, items = _loaded(tiny_model, **options)
    for item in items:
        assert item.endings[item.label] == item.key
        assert len(set(item.endings)) == len(item.endings) == options.get("candidates", 4)
        assert sum(e == item.key for e in item.endings) == 1
        assert all(len(e) == 5 and e.isdigit() for e in item.endings)
    assert len({it.label for it in items}) > 1  # the gold position is shuffled


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depth": 1.5}, "depth must be a number in \\[0, 1\\]"),
        ({"depth": -0.1}, "depth must be a number in \\[0, 1\\]"),
        ({"depth": [0.8, 0.2]}, "lo <= hi"),
        ({"keys": 0}, "keys must be an integer >= 1"),
        ({"keys": 21}, "at most 20"),
        ({"candidates": 1}, "candidates must be an integer >= 2"),
        ({"colour": "red"}, "colour"),
        ({"question_first": "yes"}, "question_first must be true or false"),
        ({"distractors": "close"}, "distractors must be one of"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_task("passkey", options)


def test_length_beyond_context_and_too_short(tiny_model):
    with pytest.raises(ValueError, match="exceed the model's context of 2048 positions"):
        _loaded(tiny_model, length=2048)
    with pytest.raises(ValueError, match="too short"):
        _loaded(tiny_model, length=60)
    with pytest.raises(ValueError, match="exceed the model's context"):
        _env(tiny_model, length=4000)


def test_env_episodes_pass_check_env(tiny_model):
    from gymnasium.utils.env_checker import check_env

    env = _env(tiny_model)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(options={"row": env.items[0].row})
    assert info["shots"] == 0 and info["prompt_tokens"] <= LENGTH
    assert env.episode_inputs(env.items[0].row)[0] == env.items[0]


def _episode(env, row, action=0):
    env.reset(options={"row": row})
    done = False
    while not done:
        _, _, done, _, info = env.step(action)
    return info


def test_greedy_exact_match_leaves_the_episode_unchanged(tiny_model):
    env = _env(tiny_model, keys=2)
    row = env.items[1].row
    with pytest.raises(RuntimeError, match="finished episode"):
        env.reset(options={"row": row})
        env.greedy_exact_match()
    info = _episode(env, row)
    cache = env._episode.cache
    length, bits = cache.get_seq_length(), list(cache.block_bits)
    first = env.greedy_exact_match()
    assert isinstance(first, bool)
    assert env.greedy_exact_match() == first  # the cache is as it was: the same decode again
    assert cache.get_seq_length() == length and list(cache.block_bits) == bits
    again = _episode(env, row)
    assert again == info
    assert isinstance(env.greedy_exact_match(), bool)


def test_greedy_exact_match_is_true_when_the_model_says_the_key(tiny_model, monkeypatch):
    env = _env(tiny_model)
    _episode(env, env.items[0].row)
    monkeypatch.setattr(env.tokenizer, "decode", lambda ids: " " + env._episode.item.key)
    assert env.greedy_exact_match() is True
    monkeypatch.setattr(env.tokenizer, "decode", lambda ids: " 00000")
    assert env.greedy_exact_match() is False


def test_evaluate_records_exact_match(tmp_path, monkeypatch):
    from envs.kv_precision import EnvConfig
    from experiments import evaluate
    from experiments.evaluate import EvaluateConfig

    monkeypatch.setenv("WANDB_MODE", "disabled")
    env = EnvConfig(**{**ENV, "task_options": {"length": LENGTH, "items": 12}, "data_path": None})
    cfg = EvaluateConfig(env=env, policies=["fp16", "fixed:2"], references=("fp16",), items=2, out_dir=str(tmp_path / "eval"),
                         progress=False)
    out = evaluate.run(cfg)
    records = evaluate._load_done(tmp_path / "eval" / "records.jsonl")[0]
    assert len(records) == 4 and all(r["exact_match"] in (0, 1) for r in records)
    assert set(out["policies"]["fp16"]["summary"]["exact_match"]) >= {"lo", "hi"}


def test_fp16_evaluator_scores_the_env_prompts(tiny_model):
    """experiments.eval_fp16 through the task scores what the env's full-precision reference scores."""
    import numpy as np

    from experiments.eval_fp16 import evaluate_fp16

    env = _env(tiny_model)
    item = env.items[0]
    (rec,) = evaluate_fp16(env.model, env.tokenizer, [item], env.pool, shots=5, seed=0, progress=False,
                           task=env.task)["records"]
    reference = env.reference_for(item.row)
    np.testing.assert_allclose(rec["scores"], reference.ending_scores, atol=1e-4)
    assert (rec["pred"], rec["pred_norm"]) == (reference.pred, reference.pred_norm)
    assert rec["prompt_tokens"] == len(env.episode_inputs(item.row)[1])


def test_batched_vector_env_runs_the_task(tiny_model):
    """Rows of the vector env are siblings: they rebuild the task from the same source, same prompts."""
    from envs.vector import KVPrecisionVectorEnv

    model, tokenizer = tiny_model
    venv = KVPrecisionVectorEnv(2, lm=model, tokenizer=tokenizer, items=SOURCE,
                                **{**ENV, "task_options": {"length": LENGTH, "items": 12}})
    rows = [it.row for it in venv.envs[0].items[:2]]
    _, infos = venv.reset(options={"rows": rows})
    assert [env.episode_inputs(r) for env, r in zip(venv.envs, rows, strict=True)] == [
        venv.envs[0].episode_inputs(r) for r in rows
    ]
    assert list(infos["prompt_tokens"]) == [len(venv.envs[0].episode_inputs(r)[1]) for r in rows]

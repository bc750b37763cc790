import json
from collections import Counter

import numpy as np
import pytest

from envs.hellaswag import (
    HellaSwagItem,
    build_prompt,
    default_hellaswag_path,
    load_hellaswag,
    preprocess,
    sample_shots,
    split_items,
)


def _items(n: int) -> list[HellaSwagItem]:
    return [HellaSwagItem(i, f"Act{i}", f"ctx {i}", ("a", "b", "c", "d"), i % 4) for i in range(n)]


@pytest.fixture(scope="module")
def shared_items(hellaswag_path):
    return load_hellaswag(hellaswag_path)


def test_shared_file_matches_readme(shared_items):
    assert len(shared_items) == 10042
    assert Counter(it.label for it in shared_items) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    first = shared_items[0]
    assert first.row == 0 and first.query == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.gold_ending == "starts pulling up roofing on a roof."
    assert all(len(it.endings) == 4 for it in shared_items)


def test_default_path_and_env_override(hellaswag_path, monkeypatch, tmp_path):
    monkeypatch.delenv("KVGYM_HELLASWAG", raising=False)
    assert default_hellaswag_path().resolve() == hellaswag_path.resolve()
    monkeypatch.setenv("KVGYM_HELLASWAG", str(tmp_path / "x.jsonl"))
    assert default_hellaswag_path() == tmp_path / "x.jsonl"
    with pytest.raises(FileNotFoundError, match="shared"):
        load_hellaswag()


def test_hub_schema_cleaned_like_lm_eval(tmp_path):
    doc = {"ind": 24, "activity_label": "Finance and Business", "ctx_a": "[header] How to save money",
           "ctx_b": "[title] make a budget [step] write it down.", "ctx": "unused",
           "endings": ["You  spend less. [substeps] Really.", "b", "c", "d"], "label": "2",
           "source_id": "wikihow~1", "split": "val", "split_type": "indomain"}
    path = tmp_path / "hub.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    (item,) = load_hellaswag(path)
    assert item.row == 24 and item.label == 2
    # lm-eval cleans the whole query in one go (utils.process_docs); the split item must rebuild it.
    lm_eval_query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    assert item.query == lm_eval_query == "Finance and Business: How to save money. make a budget write it down."
    assert item.endings[0] == "You spend less. Really."


def test_malformed_lines_name_file_and_line(tmp_path):
    good = {"row": 0, "activity_label": "A", "ctx": "c", "endings": ["a", "b"], "label": 1}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_hellaswag(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({k: v for k, v in good.items() if k != "ctx"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3.*ctx"):
        load_hellaswag(path)
    path.write_text(json.dumps({**good, "label": 5}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        load_hellaswag(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared/data"):
        load_hellaswag(tmp_path / "nope.jsonl")


def test_split_is_disjoint_deterministic_and_order_free():
    items = _items(50)
    a = split_items(items, 10, seed=3)
    b = split_items(list(reversed(items)), 10, seed=3)
    c = split_items(items, 10, seed=4)
    assert a == b
    assert [it.row for it in a.eval] != [it.row for it in c.eval]
    rows_eval, rows_pool = {it.row for it in a.eval}, {it.row for it in a.pool}
    assert len(rows_eval) == 10 and not rows_eval & rows_pool and len(rows_eval | rows_pool) == 50
    with pytest.raises(ValueError, match="eval_size"):
        split_items(items, 51)


def test_build_prompt_exact():
    shots = [HellaSwagItem(1, "A", "x y", ("e0", "e1"), 1), HellaSwagItem(2, "B", "z", ("f0", "f1"), 0)]
    item = HellaSwagItem(3, "C", "q", ("g0", "g1"), 0)
    assert build_prompt(item, shots) == "A: x y e1\n\nB: z f0\n\nC: q"
    assert build_prompt(item, []) == "C: q"


def test_sample_shots_excludes_item_and_is_seeded():
    pool = _items(6)
    for seed in range(20):
        shots = sample_shots(pool, 5, np.random.default_rng(seed), exclude_row=2)
        assert len({s.row for s in shots}) == 5 and 2 not in {s.row for s in shots}
    assert sample_shots(pool, 3, np.random.default_rng(7), 0) == sample_shots(pool, 3, np.random.default_rng(7), 0)
    assert sample_shots(pool, 0, np.random.default_rng(0), 0) == []
    with pytest.raises(ValueError, match="pool"):
        sample_shots(pool, 6, np.random.default_rng(0), exclude_row=2)

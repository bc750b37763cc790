import json

import pytest

from envs.hellaswag import HellaSwagItem, load_hellaswag, split_items
from experiments.eval_fp16 import evaluate_fp16, main
from experiments.stats import proportion_ci


def _items(n, offset=0):
    return [HellaSwagItem(offset + i, "Cooking", f"A cook stirs pot {i}. she",
                          ("adds salt.", "runs away quickly.", "sings.", "turns off the stove and leaves."), i % 4)
            for i in range(n)]


def test_evaluator_records_and_summary(tiny_model):
    model, tok = tiny_model
    items, pool = _items(6), _items(10, offset=100)
    out = evaluate_fp16(model, tok, items, pool, shots=2, seed=0, progress=False)
    recs, s = out["records"], out["summary"]
    assert [r["row"] for r in recs] == [it.row for it in items]
    for r, it in zip(recs, items, strict=True):
        assert len(r["scores"]) == 4 and all(x < 0 for x in r["scores"])
        assert r["gold"] == it.label and r["correct"] == (r["pred"] == it.label)
        assert r["prompt_tokens"] > len(tok.encode(it.query))  # two shots precede the query
    assert s["items"] == 6 and s["acc"] == pytest.approx(sum(r["correct"] for r in recs) / 6)
    for key, field in (("acc", "correct"), ("acc_norm", "correct_norm")):
        wilson = proportion_ci(sum(r[field] for r in recs), len(recs))  # the interval evaluate reports
        assert s[f"{key}_ci95"] == [wilson.lo, wilson.hi] and s[key] == wilson.mean
    batched = evaluate_fp16(model, tok, items, pool, shots=2, seed=0, progress=False, batch_items=4)
    for a, b in zip(recs, batched["records"], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4) and a["prompt_tokens"] == b["prompt_tokens"]


def test_cli_writes_json(tmp_path, hellaswag_path):
    out = tmp_path / "r.json"
    main(["--model", "tiny-random-llama", "--data", str(hellaswag_path), "--limit", "3", "--shots", "1",
          "--eval-size", "50", "--out", str(out), "--no-progress"])
    data = json.loads(out.read_text())
    assert data["summary"]["items"] == 3 and data["config"]["shots"] == 1
    expected_rows = [it.row for it in split_items(load_hellaswag(hellaswag_path), 50, seed=0).eval[:3]]
    assert [r["row"] for r in data["records"]] == expected_rows


@pytest.mark.integration
def test_embedded_evaluator_few_items(embedded_model, hellaswag_path):
    model, tok = embedded_model
    splits = split_items(load_hellaswag(hellaswag_path), 1000, seed=0)
    out = evaluate_fp16(model, tok, splits.eval[:5], splits.pool, shots=0, seed=0, progress=False)
    assert out["summary"]["items"] == 5
    assert all(10 < r["prompt_tokens"] < 200 for r in out["records"])
    assert all(-200 < x < 0 for r in out["records"] for x in r["scores"])


def test_write_json_is_strict_and_leaves_no_temp(tmp_path):
    import numpy as np

    from experiments.io import write_json

    path = write_json(tmp_path / "sub" / "x.json", {"a": float("nan"), "b": np.float32(1.5), "c": (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]

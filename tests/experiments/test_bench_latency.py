"""experiments.bench_latency: the specs it times and the table it writes (read back by envs.latency)."""

from __future__ import annotations

import json

import pytest

from envs.fingerprint import fingerprint
from envs.latency import load_latency_table
from experiments.bench_latency import device_label, latency_specs, latency_table


def test_specs_cover_the_grid_with_and_without_sinks_beside_dynamic_and_mixed():
    specs = latency_specs([2, (4, 2), 16], sink_tokens=4)
    assert [(s.name, s.kind, s.bits, s.sink_tokens) for s in specs] == [
        ("dynamic", "dynamic", 16, 0), ("2", "ours", 2, 0), ("k4v2", "ours", (4, 2), 0), ("16", "ours", 16, 0),
        ("2+s4", "ours", 2, 4), ("k4v2+s4", "ours", (4, 2), 4), ("mixed", "ours", 0, 0)]
    assert [s.name for s in latency_specs([4], sink_tokens=0)] == ["dynamic", "4", "mixed"]


def _row(cache, tok_s, **kw):
    runs = [{"decode_tok_s": t} for t in tok_s]
    base = dict(context=64, cache=cache, bits=4, sink_tokens=0, average_bits=4.0, ratio_to_fp16=0.28,
                decode_tok_s=sorted(tok_s)[len(tok_s) // 2], decode_slowdown_vs_dynamic=0.0,
                prefill_slowdown_vs_dynamic=0.0, runs=runs)
    return {**base, **kw}


def test_table_is_labelled_and_reads_back(tmp_path):
    result = {"rows": [_row("dynamic", [10.0, 20.0, 10.0]),
                       _row("4", [8.0, 16.0, 5.0], decode_slowdown_vs_dynamic=0.25)],
              "prompt_source": {"64": "random"}}
    fp = fingerprint("cpu", "float32")
    table = latency_table(result, fp, {"context": 64, "threads": 1})
    assert table["label"] == device_label(fp) and table["label"].startswith("cpu-")
    assert table["context"] == 64 and table["threads"] == 1 and table["fingerprint"] == fp
    assert table["settings"]["4"]["relative_decode_cost"] == pytest.approx(1.25)
    assert table["settings"]["4"]["relative_decode_cost_rounds"] == [1.25, 1.25, 2.0]
    assert "dynamic" not in table["settings"]
    path = tmp_path / f"{table['label']}.json"
    path.write_text(json.dumps(table))
    loaded = load_latency_table(path)
    assert loaded.cost("4") == pytest.approx(1.25) and loaded.label == table["label"]

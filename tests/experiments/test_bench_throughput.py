"""experiments.bench_throughput: every runner measured on the tiny model, one table, a JSON file."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import bench_throughput


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_throughput.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "--num-envs" in capsys.readouterr().out


def test_smoke_on_the_tiny_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "bench.json"
    results = bench_throughput.main(["--model", "tiny-random-llama", "--episodes", "3", "--num-envs", "2",
                                     "--shots", "0", "--out", str(out)])
    assert set(results) == {"single", "sync", "batched", "batched-scoring", "ray"}
    for name, r in results.items():
        assert r["episodes_per_s"] > 0, name
    assert results["single"]["episodes"] == 3 and results["sync"]["episodes"] >= 3
    assert results["single"]["whole_env_over_bare_sdpa"] > 1  # the env does more than the bare forward
    assert "SyncVectorEnv(2)" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"]["ray"]["workers"] == 2


def test_batched_row_runs_the_single_envs_rows(tmp_path, capsys):
    results = bench_throughput.main(["--model", "tiny-random-llama", "--episodes", "3", "--num-envs", "2",
                                     "--shots", "0", "--rows", "single", "batched", "batched-scoring",
                                     "--out", str(tmp_path / "b.json")])
    for name in ("batched", "batched-scoring"):  # each row once, endings scored row by row or together
        assert results[name]["episodes"] == 3 and results[name]["episodes_per_s"] > 0
    assert results["batched-scoring"]["bare_batching"] is None  # measured once, on the batched row
    out = capsys.readouterr().out
    assert "batched vector env (2)" in out and "+ endings in one forward" in out


def test_the_bare_batching_gain_times_the_same_blocks_both_ways(tmp_path, capsys):
    results = bench_throughput.main(["--model", "tiny-random-llama", "--episodes", "2", "--num-envs", "2", "--shots",
                                     "0", "--interval", "8", "--rows", "batched", "--out", str(tmp_path / "b.json")])
    gain = results["batched"]["bare_batching"]
    assert gain["rows"] == 2 and gain["blocks"] >= 1 and gain["single_seconds"] > 0 and gain["batched_seconds"] > 0
    assert gain["gain"] == pytest.approx(gain["single_seconds"] / gain["batched_seconds"])
    assert "2 rows in one batch / one at a time" in capsys.readouterr().out


def test_references_are_stored_before_any_runner_is_timed(tmp_path, monkeypatch):
    """Otherwise the first runner pays every reference pass and the later ones read them for free."""
    import envs.reference_store as reference_store

    monkeypatch.setattr(reference_store, "default_reference_root", lambda: tmp_path / "references")
    args = bench_throughput.parse_args(["--model", "tiny-random-llama", "--episodes", "3", "--num-envs", "2",
                                        "--shots", "0"])
    assert bench_throughput.store_references(args) == 4  # the warm-up row and the 3 measured ones
    assert len(list((tmp_path / "references").glob("*.safetensors"))) == 4


def test_the_op_counter_counts_each_dispatched_operator():
    x = torch.ones(3)
    with bench_throughput.TorchOpCounter() as counter:
        y = x + x
        y.mul_(2)
    assert counter.ops == 2 and y.tolist() == [4.0, 4.0, 4.0]


def test_ops_per_row_step_are_counted_on_request(tmp_path, capsys):
    """Batching shares the model's operators among the rows: a row-step of the batched env issues fewer."""
    argv = ["--model", "tiny-random-llama", "--episodes", "2", "--num-envs", "2", "--shots", "0",
            "--rows", "single", "batched"]
    plain = bench_throughput.main([*argv, "--out", str(tmp_path / "a.json")])
    assert plain["single"]["ops_per_row_step"] is None and "ops/row-step" not in capsys.readouterr().out
    counted = bench_throughput.main([*argv, "--count-ops", "--out", str(tmp_path / "b.json")])
    single, batched = counted["single"]["ops_per_row_step"], counted["batched"]["ops_per_row_step"]
    assert 0 < batched < single
    assert "ops/row-step" in capsys.readouterr().out


def test_paired_runners_take_the_rows_in_rounds_in_turn(monkeypatch):
    """--rounds: the single and batched runners run the same parts of the rows, one after another (in reverse
    every other round), and their rounds are summed; an unpaired runner (sync) runs once on all the rows."""
    calls = []

    def fake(name):
        def run(args):
            calls.append((name, tuple(args.measured), args.first_round))
            seconds = len(args.measured) * (1.0 if name == "single" else 0.5)
            return {"episodes": len(args.measured), "seconds": seconds, "episodes_per_s": len(args.measured) / seconds,
                    "threads": 1, **({"bare_sdpa_seconds": seconds / 2, "whole_env_over_bare_sdpa": 2.0}
                                     if name == "single" else {})}
        return run

    monkeypatch.setattr(bench_throughput, "BENCHES", {name: fake(name) for name in ("single", "batched", "sync")})
    args = bench_throughput.parse_args(["--episodes", "7", "--num-envs", "2", "--rounds", "3",
                                        "--rows", "single", "sync", "batched"])
    results = bench_throughput.run_rounds(args)
    assert calls == [("single", (1, 2, 3), True), ("batched", (1, 2, 3), True),
                     ("batched", (4, 5), False), ("single", (4, 5), False),
                     ("single", (6, 7), False), ("batched", (6, 7), False),
                     ("sync", (1, 2, 3, 4, 5, 6, 7), True)]
    assert list(results) == ["single", "sync", "batched"]
    assert results["single"]["episodes"] == 7 and results["single"]["seconds"] == 7.0
    assert results["batched"]["episodes_per_s"] == 2.0 and len(results["batched"]["rounds"]) == 3
    assert results["single"]["whole_env_over_bare_sdpa"] == 2.0
    table = bench_throughput.format_table(results, 2)
    assert "2.00-2.00" in table and "3 rounds" in table
    # never more rounds than parts of num_envs rows (the batched env's reset needs one row per env)
    calls.clear()
    bench_throughput.run_rounds(bench_throughput.parse_args(["--episodes", "3", "--num-envs", "2", "--rounds", "3",
                                                             "--rows", "single"]))
    assert calls == [("single", (1, 2, 3), True)]

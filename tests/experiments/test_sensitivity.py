"""experiments.sensitivity on the tiny model: the counterfactual episodes and what they report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import sensitivity
from experiments.sensitivity import SensitivityConfig, run_schedule

# 0 shots and 64-token blocks: real HellaSwag contexts are a few hundred bytes, so 3-6 blocks each
ENV = EnvConfig(model="tiny-random-llama", shots=0, interval=64, group_size=16, eval_size=20, split="train")


def _cfg(tmp_path, **kw) -> SensitivityConfig:
    return SensitivityConfig(**{"env": ENV, "items": 2, "out": str(tmp_path / "s.json"), "progress": False, **kw})


def test_damage_is_each_one_low_block_against_the_base_episode(tmp_path):
    result = sensitivity.run(_cfg(tmp_path))
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["blocks"] == result["blocks"] == len(written["measurements"]) > 2
    env = KVPrecisionEnv(ENV)
    m = written["measurements"][1]
    base, _ = run_schedule(env, m["row"], 4)
    low = [2 if i == m["block"] else 4 for i in range(m["blocks"])]
    info, seen = run_schedule(env, m["row"], low)
    env.close()
    assert m["damage"] == pytest.approx(info["loglik_delta"] - base["loglik_delta"])
    assert m["obs"] == pytest.approx(seen[m["block"]].tolist())  # blocks before j are at base bits
    assert any(abs(b["damage"]) > 1e-6 for b in written["measurements"])
    assert set(written["spearman"]) == set(written["observation_names"])
    assert (tmp_path / "s.json.config.yaml").is_file()


def test_equal_widths_do_no_damage(tmp_path):
    result = sensitivity.run(_cfg(tmp_path, items=1, low_bits=4))
    assert all(b["damage"] == 0.0 for b in result["measurements"])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="held-out"):
        sensitivity.run(_cfg(tmp_path, env=EnvConfig(**{**ENV.__dict__, "split": "eval"})))
    with pytest.raises(ValueError, match="not in the env's menu"):
        sensitivity.run(_cfg(tmp_path, low_bits=3))
    with pytest.raises(ValueError, match="items"):
        sensitivity.run(_cfg(tmp_path, items=0))
    env = KVPrecisionEnv(ENV)
    with pytest.raises(ValueError, match="blocks"):
        run_schedule(env, env.items[0].row, [2])
    env.close()


def test_help(capsys):
    with pytest.raises(SystemExit):
        sensitivity.main(["--help"])
    assert "low_bits" in capsys.readouterr().out


def test_layers_mode_lowers_one_groups_keys_or_values_for_the_whole_prompt(tmp_path):
    env_cfg = EnvConfig(**{**ENV.__dict__, "layer_groups": 2})
    result = sensitivity.run(_cfg(tmp_path, env=env_cfg, mode="layers"))
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["mode"] == "layers" and written["layer_groups"] == 2
    ms = written["measurements"]
    assert [(m["group"], m["half"], m["setting"]) for m in ms[:4]] == [
        (0, "keys", "k2v4"), (0, "values", "k4v2"), (1, "keys", "k2v4"), (1, "values", "k4v2")]
    assert len(ms) == 2 * 2 * 2  # items x groups x halves
    assert set(result["damage_by_group"]) == {0, 1} and result["damage_by_group"][1]["layers"] == [1, 2]
    env = KVPrecisionEnv(EnvConfig(**{**env_cfg.__dict__, "bits": sensitivity.layer_menu(4, 2)}))
    m = ms[3]
    base = sensitivity.run_group_settings(env, m["row"], [4, 4])
    low = sensitivity.run_group_settings(env, m["row"], [4, (4, 2)])
    env.close()
    assert m["damage"] == pytest.approx(low["loglik_delta"] - base["loglik_delta"])
    assert any(abs(m["damage"]) > 1e-6 for m in ms)
    assert written["damage_by_group"]["0"]["keys"]["mean"] == pytest.approx(
        sum(m["damage"] for m in ms if m["group"] == 0 and m["half"] == "keys") / 2)


def test_layers_mode_with_equal_widths_does_no_damage_and_bad_mode_is_refused(tmp_path):
    env_cfg = EnvConfig(**{**ENV.__dict__, "layer_groups": 2})
    result = sensitivity.run(_cfg(tmp_path, env=env_cfg, mode="layers", items=1, low_bits=4))
    assert all(m["damage"] == 0.0 for m in result["measurements"])
    with pytest.raises(ValueError, match="mode"):
        sensitivity.run(_cfg(tmp_path, mode="layer"))


def test_every_feature_of_any_list_gets_a_spearman_with_an_interval(tmp_path, capsys):
    """The damage-seeking features too: each observation entry has a Spearman (scipy.stats) and a
    bootstrap interval over items, in the JSON and in the printed table."""
    from scipy import stats

    from envs.features import DEFAULT_FEATURES

    features = [*DEFAULT_FEATURES, "recv_attn", "attn_kv_error", "sink", "blocks_left"]
    out = tmp_path / "s.json"
    sets = {"env.model": "tiny-random-llama", "env.shots": 0, "env.interval": 64, "env.group_size": 16,
            "env.eval_size": 20, "env.split": "train", "env.sink_tokens": 4,
            "env.features": "[" + ", ".join(features) + "]", "items": 3, "bootstrap": 200,
            "progress": "false", "out": str(out)}
    assert sensitivity.main([a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    names = written["observation_names"]
    assert {"recv_attn_mean", "recv_attn_max", "attn_kv_error_mean", "attn_kv_error_max", "sink",
            "blocks_left"} <= set(names)
    assert list(written["spearman"]) == names and written["items"] == 3
    obs = np.array([m["obs"] for m in written["measurements"]])
    damage = [m["damage"] for m in written["measurements"]]
    for name in names:
        assert f"  {name} " in printed
        entry = written["spearman"][name]
        if name == "sink":  # 4 sinks in 64-token blocks: 1/16 at block 0, 0 after it (a constant: no rank)
            assert entry["all"] is not None and entry["after_block_0"] is None
            continue
        column = obs[:, names.index(name)]
        assert entry["all"] == pytest.approx(stats.spearmanr(column, damage).statistic)
        lo, hi = entry["all_ci"]
        assert -1 <= lo <= hi <= 1


def test_rank_correlations_match_scipy_column_by_column():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(30, 3)).astype(float)  # ties
    x[:, 2] = 1.0  # a constant column: nan, as scipy
    y = rng.normal(size=30)
    got = sensitivity._rank_correlations(x, y)
    assert got[:2] == pytest.approx([stats.spearmanr(x[:, i], y).statistic for i in range(2)])
    assert math.isnan(got[2])


def test_bootstrap_interval_resamples_items_and_is_reproducible():
    rng = np.random.default_rng(1)
    items = np.repeat(np.arange(8), 5)
    signal = rng.normal(size=40)
    obs = np.column_stack([signal, rng.normal(size=40)])
    damage = signal + 0.3 * rng.normal(size=40)
    a = sensitivity.spearman_with_ci(obs, damage, items, 300, np.random.default_rng(0))
    b = sensitivity.spearman_with_ci(obs, damage, items, 300, np.random.default_rng(0))
    assert a == b
    assert a[0]["lo"] > 0.5 and a[0]["lo"] <= a[0]["rho"] <= a[0]["hi"]  # a real signal excludes 0
    assert a[1]["lo"] < a[1]["hi"]
    none = sensitivity.spearman_with_ci(obs, damage, items, 0, np.random.default_rng(0))
    assert math.isnan(none[0]["lo"]) and none[0]["rho"] == a[0]["rho"]


def test_extra_low_settings_average_the_damage(tmp_path):
    result = sensitivity.run(_cfg(tmp_path, items=1, extra_low=(8,), bootstrap=0))
    assert result["low_settings"] == ["2", "8"]
    for m in result["measurements"]:
        assert set(m["damages"]) == {"2", "8"}
        assert m["damage"] == pytest.approx((m["damages"]["2"] + m["damages"]["8"]) / 2)
    assert result["setting_agreement"]["settings"] == ["2", "8"]
    with pytest.raises(ValueError, match="not in the env's menu"):
        sensitivity.run(_cfg(tmp_path, extra_low=("k4v2",)))
    with pytest.raises(ValueError, match="extra_low"):
        sensitivity.run(_cfg(tmp_path, mode="layers", extra_low=(8,)))

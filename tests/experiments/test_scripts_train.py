"""Training-side scripts (collect, train_mlp, train_ppo, generate) end to end on the tiny random Llama."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math

import numpy as np
import pytest
import torch

from agents import make_policy
from agents.mlp import MLPPolicy
from agents.rule import EntropyRulePolicy
from envs.cache_kwarg import with_cache
from envs.features import BlockContext, EpisodeState, FeatureSet, RunningFrequency
from envs.kv_precision import EnvConfig
from envs.model import load_model
from experiments import collect, generate, train_mlp, train_ppo
from quant.kv_cache import MixedPrecisionKVCache

SCRIPTS = ["collect", "train_mlp", "train_ppo", "generate"]
TINY = EnvConfig(model="tiny-random-llama", shots=0, interval=64)
NAMES = FeatureSet(TINY.features).observation_names
BITS = (2, 4, 8, 16)


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


# ------------------------------------------------------------------------------------------- CLI basics
@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_config_keys(name, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"experiments.{name}").main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "out_dir" in out and "seed" in out
    if name != "train_mlp":
        assert "env.model" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_override_is_named(name, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"experiments.{name}").main(["--set", "out_dirr=x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "out_dirr" in err and "did you mean 'out_dir'" in err


# -------------------------------------------------------------------------------------------- collect
@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect")
    cfg = collect.CollectConfig(env=TINY, episodes=2, calibrate_target_bits=6.0, calibration_episodes=1,
                                threads=1, out_dir=str(out), progress=False)
    return cfg, collect.run(cfg)


def test_collect_writes_interface_columns_labelled_by_calibrated_rule(collected):
    cfg, paths = collected
    header, rows = _read_csv(paths["csv"])
    assert header == ["item", "block", *NAMES, "latency_ms_per_token", "bits"]
    assert sum(r[1] == "0" for r in rows) == 2  # two episodes, each starting at block 0
    blocks = [int(r[1]) for r in rows]
    assert all(b == 0 or b == a + 1 for a, b in zip(blocks, blocks[1:], strict=False))
    assert all(float(r[header.index("latency_ms_per_token")]) > 0 for r in rows)
    # the labels are the calibrated rule's choices on each row's entropy (what the rollout committed)
    rule = make_policy(f"rule:{paths['thresholds']}", NAMES, BITS)
    assert isinstance(rule, EntropyRulePolicy) and rule.thresholds != EntropyRulePolicy(NAMES, BITS).thresholds
    entropy = np.array([float(r[header.index("entropy_mean")]) for r in rows])
    assert [int(r[-1]) for r in rows] == rule.chosen_bits(entropy).tolist()
    assert _read_csv(paths["calibration_csv"])[0] == header


def test_collect_resumes_complete_episodes(collected):
    cfg, paths = collected
    _, before = _read_csv(paths["csv"])
    cfg3 = collect.CollectConfig(**{**vars(cfg), "episodes": 3, "resume": True})
    _, after = _read_csv(collect.run(cfg3)["csv"])
    assert after[: len(before)] == before and sum(r[1] == "0" for r in after) == 3
    changed = collect.CollectConfig(**{**vars(cfg3), "env": EnvConfig(**{**vars(TINY), "shots": 1})})
    with pytest.raises(ValueError, match="cannot resume"):
        collect.run(changed)


def test_collect_interrupt_keeps_whole_episodes_then_resumes(tmp_path, monkeypatch):
    real = collect.run_episode

    def interrupted(env, policy, seed):
        if seed == 1:  # the second episode
            raise KeyboardInterrupt
        return real(env, policy, seed)

    cfg = collect.CollectConfig(env=TINY, episodes=2, flush_every=5, threads=1, out_dir=str(tmp_path),
                                progress=False)
    monkeypatch.setattr(collect, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect.run(cfg)
    _, rows = _read_csv(tmp_path / collect.CSV_NAME)
    assert sum(r[1] == "0" for r in rows) == 1 and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(collect, "run_episode", real)
    _, resumed = _read_csv(collect.run(collect.CollectConfig(**{**vars(cfg), "resume": True}))["csv"])
    assert resumed[: len(rows)] == rows and sum(r[1] == "0" for r in resumed) == 2


def test_collect_refuses_eval_split(tmp_path):
    cfg = collect.CollectConfig(env=EnvConfig(**{**vars(TINY), "split": "eval"}), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train split"):
        collect.run(cfg)


# ------------------------------------------------------------------------------------------ train_mlp
@pytest.fixture(scope="module")
def mlp_path(collected, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    paths = train_mlp.run(train_mlp.TrainMLPConfig(csv=str(collected[1]["csv"]), epochs=3, out_dir=str(out),
                                                   progress=False))
    confusion = json.loads(paths["confusion"].read_text())
    assert np.asarray(confusion["matrix"]).shape == (4, 4)
    assert np.asarray(confusion["matrix"]).sum() == confusion["n_val"] >= 1
    assert (out / "config.yaml").is_file()
    return paths["model"]


def test_train_mlp_controller_loads_as_policy(mlp_path):
    pol = make_policy(f"mlp:{mlp_path}", NAMES, BITS)
    assert isinstance(pol, MLPPolicy)
    assert 0 <= int(pol.predict(np.ones(len(NAMES), np.float32))[0]) < len(BITS)


def test_train_mlp_names_the_observation_columns_it_leaves_out(collected):
    _, paths = collected
    default = train_mlp.TrainMLPConfig().features
    assert train_mlp.unused_observations(paths["csv"], default) == [n for n in NAMES if n not in (*default,)]
    assert train_mlp.unused_observations(paths["csv"], NAMES) == []


def test_train_mlp_missing_csv_is_a_clear_error(tmp_path):
    cfg = train_mlp.TrainMLPConfig(csv=str(tmp_path / "nope.csv"), out_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="experiments.collect"):
        train_mlp.run(cfg)
    assert not (tmp_path / "out").exists()


def test_collect_and_train_mlp_on_a_menu_with_key_value_pairs(tmp_path):
    """Labels are setting names ("k4v2"), so the MLP trains on, and drives, a menu with pairs."""
    menu = (2, (4, 2), 4, 16)
    env_cfg = EnvConfig(**{**vars(TINY), "bits": menu, "interval": 16})
    paths = collect.run(collect.CollectConfig(env=env_cfg, policy="rule", episodes=3, out_dir=str(tmp_path / "c"),
                                              progress=False))
    header, rows = _read_csv(paths["csv"])
    labels = {r[header.index("bits")] for r in rows}
    assert labels <= {"2", "k4v2", "4", "16"} and labels
    out = train_mlp.run(train_mlp.TrainMLPConfig(csv=str(paths["csv"]), bits=menu, epochs=2,
                                                 out_dir=str(tmp_path / "m"), progress=False))
    pol = make_policy(f"mlp:{out['model']}", NAMES, menu)
    assert 0 <= int(pol.predict(np.ones(len(NAMES), np.float32))[0]) < len(menu)


def test_collect_refuses_layer_groups(tmp_path):
    cfg = collect.CollectConfig(env=EnvConfig(**{**vars(TINY), "layer_groups": 2}), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="layer_groups"):
        collect.run(cfg)


# ------------------------------------------------------------------------------------------ train_ppo
def test_train_ppo_checkpoints_and_resumes(tmp_path, capsys):
    kwargs = dict(env=TINY, algo_kwargs={"n_steps": 16, "batch_size": 8, "n_epochs": 1}, checkpoint_every=16,
                  threads=1, out_dir=str(tmp_path), progress=False)
    first = train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=32, eval_freq=16, eval_episodes=1, **kwargs))
    ckpts = train_ppo.checkpoints(first["checkpoints"])
    assert [p.name for p in ckpts] == ["ppo_16_steps.zip", "ppo_32_steps.zip"]
    assert make_policy(f"sb3:{first['model']}", NAMES, BITS).model.num_timesteps == 32
    stamp = ckpts[0].stat().st_mtime_ns

    second = train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=64, resume=True, **kwargs))
    assert "resuming from" in capsys.readouterr().out
    assert ckpts[0].stat().st_mtime_ns == stamp  # continued, not restarted (which would clear checkpoints)
    names = [p.name for p in train_ppo.checkpoints(second["checkpoints"])]
    assert names == ["ppo_16_steps.zip", "ppo_32_steps.zip", "ppo_48_steps.zip", "ppo_64_steps.zip"]
    assert make_policy(f"sb3:{second['model']}", NAMES, BITS).model.num_timesteps >= 64

    with pytest.raises(ValueError, match="cannot resume"):
        train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=80, resume=True, **{**kwargs, "algo": "A2C"}))


# ------------------------------------------------------------------------------------------- generate
def _gen_cfg(tmp_path, policy: str) -> generate.GenerateConfig:
    return generate.GenerateConfig(env=EnvConfig(model="tiny-random-llama", interval=8), policy=policy,
                                   prompts=("Explain quantization in one paragraph.",), max_new_tokens=20,
                                   min_new_tokens=20, threads=1, out_dir=str(tmp_path), progress=False)


@pytest.mark.parametrize("policy", ["fixed:4", "mlp"])
def test_generate_policy_picks_block_bits(policy, mlp_path, tmp_path):
    spec = f"mlp:{mlp_path}" if policy == "mlp" else policy
    paths = generate.run(_gen_cfg(tmp_path, spec))
    (rec,) = json.loads(paths["results"].read_text())["results"]
    assert rec["new_tokens"] == 20 and rec["decisions"]
    assert [d["bits"] for d in rec["decisions"]] == [b for b, _ in rec["block_bits"]]
    assert all(b in BITS for b, _ in rec["block_bits"])
    assert sum(n for _, n in rec["block_bits"]) + rec["pending_tokens"] == rec["prompt_tokens"] + 20 - 1
    if policy == "fixed:4":
        assert rec["avg_bits"] == 4 and rec["committed_kv_ratio"] < 0.5
    assert list(rec["decisions"][0]["obs"]) == list(NAMES)


def test_generate_keep_dequantized_decodes_the_same_tokens(tmp_path):
    """keep_dequantized only changes where the committed floats come from: same tokens, bits, bytes."""
    model, tok = load_model("tiny-random-llama")
    policy = make_policy("fixed:4", NAMES, BITS)
    cfg = _gen_cfg(tmp_path, "fixed:4")
    plain = generate.generate_one(model, tok, policy, cfg.prompts[0], cfg)
    kept = generate.generate_one(model, tok, policy, cfg.prompts[0], dataclasses.replace(cfg, keep_dequantized=True))
    assert kept["token_ids"] == plain["token_ids"] and kept["block_bits"] == plain["block_bits"]
    assert kept["committed_kv_ratio"] == plain["committed_kv_ratio"]
    assert [d["obs"] for d in kept["decisions"]] == [d["obs"] for d in plain["decisions"]]


def test_generate_features_match_a_teacher_forced_block(tmp_path):
    """Block 1 (eight 1-token decode steps) gives the features one forward over the same tokens gives."""
    cfg = _gen_cfg(tmp_path, "fixed:16")
    model, tok = load_model("tiny-random-llama")
    policy = make_policy("fixed:16", NAMES, BITS)
    rec = generate.generate_one(model, tok, policy, cfg.prompts[0], cfg)
    ids = generate.encode_prompt(tok, cfg.prompts[0])[0]
    seq = torch.cat([ids, torch.tensor(rec["token_ids"])])
    p, n_blocks = len(ids) - 1, math.ceil((len(ids) + 20) / 8)
    fs, freq = FeatureSet(TINY.features), RunningFrequency()
    cache = MixedPrecisionKVCache(config=model.config, interval=8)
    obs = []
    for k, (lo, hi) in enumerate([(0, p), (p, p + 8)]):
        with torch.inference_mode():
            out = model(input_ids=seq[lo:hi][None], **with_cache(model, cache), use_cache=True, output_attentions=True)
        state = EpisodeState(k, n_blocks, cache.average_bits() if k else 16.0,
                             cache.nbytes(False) / cache.fp16_nbytes(False) if k else 1.0, 16, 16)
        ctx = BlockContext(seq[lo:hi], out.logits[0], seq[lo + 1 : hi + 1], state, freq, out.attentions)
        obs.append(fs.observe(ctx))
        cache.commit(16)
    for k in range(2):
        got = list(rec["decisions"][k]["obs"].values())
        np.testing.assert_allclose(got, obs[k], rtol=1e-3, atol=1e-5, err_msg=f"block {k}")


def test_repeated_ngram_fraction():
    assert generate.repeated_ngram_fraction([1, 2, 3, 4, 5, 6], 4) == 0.0
    assert generate.repeated_ngram_fraction([1, 2, 1, 2, 1, 2, 1, 2], 2) == pytest.approx(5 / 7)
    assert generate.repeated_ngram_fraction([7] * 10, 4) == pytest.approx(6 / 7)
    assert generate.repeated_ngram_fraction([1, 2, 3], 4) == 0.0


def test_generate_compares_policies_with_degeneration_measures_and_sinks(tmp_path):
    """`compare` runs more policies on the same prompts; every text gets rep-4 and the fp16 perplexity; the
    env's sink tokens are kept fp16 during generation as in the env (fixed 2-bit averages above 2)."""
    cfg = _gen_cfg(tmp_path, "fixed:2")
    cfg.compare = ("fixed:16",)
    cfg.env = EnvConfig(model="tiny-random-llama", interval=8, sink_tokens=4)
    doc = json.loads(generate.run(cfg)["results"].read_text())
    assert [r["policy"] for r in doc["results"]] == ["fixed:2", "fixed:16"]
    assert set(doc["summary"]) == {"fixed:2", "fixed:16"}
    for rec in doc["results"]:
        assert 0.0 <= rec["rep_4"] <= 1.0 and math.isfinite(rec["fp16_ppl"]) and rec["fp16_ppl"] > 1.0
    low = doc["results"][0]
    assert 2.0 < low["avg_bits"] < 16.0  # 2-bit blocks plus 4 fp16 sink tokens


def test_generate_computes_the_digits_feature(tmp_path):
    """Content features that read the vocabulary work during generation as in the env."""
    cfg = _gen_cfg(tmp_path, "fixed:4")
    cfg.env = EnvConfig(model="tiny-random-llama", interval=8, features=("entropy", "digits", "novelty"))
    (rec,) = json.loads(generate.run(cfg)["results"].read_text())["results"]
    obs = rec["decisions"][0]["obs"]
    assert {"digits_mean", "digits_max", "novelty_mean"} <= set(obs)
    assert 0.0 <= obs["digits_mean"] <= obs["digits_max"] <= 1.0


def test_generate_keeps_the_env_budget_over_the_committed_tokens(tmp_path):
    """Under env.bit_budget a policy that asks for 16 bits falls back as in the env: the committed tokens
    average at most the budget, and spend more of it than the cheapest setting does."""
    cfg = _gen_cfg(tmp_path, "fixed:16")
    cfg.compare = ("fixed:2",)
    cfg.env = EnvConfig(model="tiny-random-llama", interval=8, sink_tokens=4, bit_budget=5.0)
    dear, cheap = json.loads(generate.run(cfg)["results"].read_text())["results"]
    assert len(dear["block_bits"]) >= 3
    assert cheap["avg_bits"] < dear["avg_bits"] <= 5.0 + 1e-9
    assert dear["avg_bits"] > 4.0  # the fallback spends the budget, not only the cheapest setting
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate.run(dataclasses.replace(cfg, min_new_tokens=0))
    cfg.env = EnvConfig(model="tiny-random-llama", interval=8, sink_tokens=4, bit_budget=2.0)
    with pytest.raises(ValueError, match="cannot be met"):
        generate.run(cfg)


def test_generate_computes_features_that_read_the_cache(tmp_path):
    """kv_error / attn_kv_error read the pending keys and values from the generation's own cache."""
    cfg = _gen_cfg(tmp_path, "fixed:4")
    cfg.env = EnvConfig(model="tiny-random-llama", interval=8, features=("kv_error", "attn_kv_error", "recv_attn"))
    (rec,) = json.loads(generate.run(cfg)["results"].read_text())["results"]
    for decision in rec["decisions"]:
        assert all(math.isfinite(v) and v >= 0 for v in decision["obs"].values())
    assert any(d["obs"]["kv_error_mean"] > 0 for d in rec["decisions"])

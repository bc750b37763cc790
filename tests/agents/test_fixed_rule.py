"""Fixed and entropy-rule policies, the Policy base, and the spec registry, on hand-made observations."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from agents import EntropyRulePolicy, FixedBitsPolicy, calibrate_thresholds, make_policy, register_policy
from agents.rule import DEFAULT_THRESHOLDS, max_entropy_fractions

NAMES = (
    "entropy_mean entropy_max rarity_mean rarity_max attn_var_mean token_acc_mean token_acc_min "
    "progress avg_bits kv_ratio last_bits"
).split()
BITS = (2, 4, 8, 16)


def obs_with(entropies) -> np.ndarray:
    """A batch whose entropy_mean column is ``entropies`` and everything else is noise."""
    e = np.atleast_1d(np.asarray(entropies, dtype=np.float32))
    obs = np.random.default_rng(0).uniform(0, 1, size=(len(e), len(NAMES))).astype(np.float32)
    obs[:, NAMES.index("entropy_mean")] = e
    return obs


# ------------------------------------------------------------------------------------------------ base
def test_predict_shapes_follow_sb3():
    pol = FixedBitsPolicy(NAMES, BITS, 8)
    one, state = pol.predict(obs_with(1.0)[0], state="s")
    assert one.shape == () and int(one) == 2 and state == "s"
    batch, _ = pol.predict(obs_with([1.0, 2.0, 3.0]))
    assert batch.shape == (3,) and batch.dtype == np.int64 and (batch == 2).all()


def test_predict_rejects_wrong_width_and_rank():
    pol = FixedBitsPolicy(NAMES, BITS, 4)
    with pytest.raises(ValueError, match="11"):
        pol.predict(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        pol.predict(np.zeros((2, 2, len(NAMES))))


def test_column_error_lists_names():
    pol = FixedBitsPolicy(NAMES, BITS, 4)
    assert pol.column("rarity_mean") == 2
    with pytest.raises(ValueError, match="entropy_mean"):
        pol.column("nope")


def test_bits_to_action_rounds_up_and_handles_unsorted_bits():
    pol = FixedBitsPolicy(NAMES, (16, 2, 8, 4), 4)
    # requested 1->2, 2->2, 3->4, 5->8, 9->16, 40->16 (largest)
    got = pol.bits_to_action([1, 2, 3, 5, 9, 40])
    assert [pol.bits[a] for a in got] == [2, 2, 4, 8, 16, 16]


def test_bad_constructor_inputs():
    with pytest.raises(ValueError, match="not one of"):
        FixedBitsPolicy(NAMES, BITS, 3)
    with pytest.raises(ValueError, match="duplicates"):
        FixedBitsPolicy(["a", "a"], BITS, 4)
    with pytest.raises(ValueError, match="distinct"):
        FixedBitsPolicy(NAMES, (4, 4), 4)


# ------------------------------------------------------------------------------------------------ rule
def test_rule_thresholds_map_to_bits():
    pol = EntropyRulePolicy(NAMES, BITS, thresholds=(1.0, 2.0, 3.0))
    actions, _ = pol.predict(obs_with([0.5, 1.0, 1.5, 2.0, 2.99, 3.0, 7.0]))
    assert [BITS[a] for a in actions] == [2, 4, 4, 8, 8, 16, 16]
    single, _ = pol.predict(obs_with(2.5)[0])
    assert single.shape == () and BITS[int(single)] == 8


def test_rule_defaults_and_other_bit_sets():
    assert EntropyRulePolicy(NAMES, BITS).thresholds == DEFAULT_THRESHOLDS
    pol = EntropyRulePolicy(NAMES, (8, 2), thresholds=(2.5,))  # unsorted env bits, two widths
    actions, _ = pol.predict(obs_with([1.0, 4.0]))
    assert [pol.bits[a] for a in actions] == [2, 8]
    assert len(EntropyRulePolicy(NAMES, (2, 4, 8)).thresholds) == 2
    with pytest.raises(ValueError, match="need 3 thresholds"):
        EntropyRulePolicy(NAMES, BITS, thresholds=(1.0, 2.0))
    with pytest.raises(ValueError, match="non-decreasing"):
        EntropyRulePolicy(NAMES, BITS, thresholds=(3.0, 2.0, 4.0))
    with pytest.raises(ValueError, match="needs observation 'attn'"):
        EntropyRulePolicy(NAMES, BITS, feature="attn")


def test_rule_can_read_another_feature():
    pol = EntropyRulePolicy(NAMES, BITS, thresholds=(0.1, 0.2, 0.3), feature="rarity_mean")
    obs = obs_with([0.0, 0.0])
    obs[:, NAMES.index("rarity_mean")] = [0.05, 0.25]
    assert [BITS[a] for a in pol.predict(obs)[0]] == [2, 8]


@pytest.mark.parametrize("target", [2.5, 4.0, 6.43, 9.0, 14.0])
def test_calibration_hits_target_average_bits(target):
    entropies = np.random.default_rng(1).gamma(4.0, 0.8, size=2000)
    thresholds = calibrate_thresholds(entropies, BITS, target)
    pol = EntropyRulePolicy(NAMES, BITS, thresholds)
    assert abs(pol.chosen_bits(entropies).mean() - target) < 0.05
    assert list(thresholds) == sorted(thresholds)


def test_calibration_fractions_and_endpoints():
    p = max_entropy_fractions(BITS, 6.0)
    assert p.sum() == pytest.approx(1.0) and p @ np.array(BITS) == pytest.approx(6.0)
    assert (p > 0).all()  # max-entropy mix starves no width for an interior target
    e = np.linspace(0, 5, 100)
    assert (EntropyRulePolicy(NAMES, BITS, calibrate_thresholds(e, BITS, 2.0)).chosen_bits(e) == 2).all()
    assert (EntropyRulePolicy(NAMES, BITS, calibrate_thresholds(e, BITS, 16.0)).chosen_bits(e) == 16).all()
    with pytest.raises(ValueError, match="must lie in"):
        calibrate_thresholds(e, BITS, 17.0)


def test_rule_save_load_roundtrip_and_errors(tmp_path):
    path = tmp_path / "sub" / "rule.yaml"
    EntropyRulePolicy(NAMES, BITS, (1.5, 2.5, 3.25)).save(path)
    assert yaml.safe_load(path.read_text())["thresholds"] == [1.5, 2.5, 3.25]
    assert EntropyRulePolicy.load(path, NAMES, BITS).thresholds == (1.5, 2.5, 3.25)
    assert not list(path.parent.glob("*.tmp"))
    # infinite thresholds (from calibration at an endpoint) survive YAML
    EntropyRulePolicy(NAMES, BITS, (float("-inf"), 1.0, float("inf"))).save(path)
    assert EntropyRulePolicy.load(path, NAMES, BITS).thresholds == (float("-inf"), 1.0, float("inf"))
    with pytest.raises(ValueError, match="calibrated for bits"):
        EntropyRulePolicy.load(path, NAMES, (2, 4, 8))
    with pytest.raises(FileNotFoundError):
        EntropyRulePolicy.load(tmp_path / "missing.yaml", NAMES, BITS)
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="not a rule file"):
        EntropyRulePolicy.load(tmp_path / "bad.yaml", NAMES, BITS)


# -------------------------------------------------------------------------------------------- registry
def test_make_policy_specs(tmp_path):
    fixed = make_policy("fixed:4", NAMES, BITS)
    assert isinstance(fixed, FixedBitsPolicy) and fixed.name == "fixed:4"
    assert make_policy("fp16", NAMES, BITS).value == 16
    assert make_policy("rule", NAMES, BITS).name == "rule"
    assert make_policy("rule:1,2,3", NAMES, BITS).thresholds == (1.0, 2.0, 3.0)
    path = tmp_path / "t.yaml"
    EntropyRulePolicy(NAMES, BITS, (0.5, 1.0, 1.5)).save(path)
    assert make_policy(f"rule:{path}", NAMES, BITS).thresholds == (0.5, 1.0, 1.5)


def test_make_policy_reads_names_and_bits_from_env():
    class Env:
        unwrapped = type("U", (), {"observation_names": tuple(NAMES), "bits": BITS})()

    assert make_policy("fixed:16", env=Env()).predict(obs_with(1.0)[0])[0] == 3


def test_make_policy_errors():
    with pytest.raises(ValueError, match="known: .*fixed.*rule"):
        make_policy("nope:1", NAMES, BITS)
    with pytest.raises(ValueError, match="needs an argument"):
        make_policy("fixed", NAMES, BITS)
    with pytest.raises(ValueError, match="integer"):
        make_policy("fixed:four", NAMES, BITS)
    with pytest.raises(ValueError, match="observation_names and bits"):
        make_policy("rule")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("fixed")(lambda *a: None)


def test_calibration_on_a_menu_with_key_value_pairs_counts_their_mean_bits():
    menu = (2, (4, 2), 4, 8, 16)
    entropies = np.random.default_rng(2).gamma(4.0, 0.8, size=2000)
    pol = EntropyRulePolicy(NAMES, menu, calibrate_thresholds(entropies, menu, 2.9))
    assert pol.chosen_bits(entropies).mean() == pytest.approx(2.9, abs=0.05)
    assert max_entropy_fractions(menu, 3.0) @ np.array([2, 3, 4, 8, 16]) == pytest.approx(3.0)

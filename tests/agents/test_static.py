"""StaticSchedulePolicy: position bins, acting, the JSON file and the registry spec ``static:<path>``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envs"))
from _tiny_env import ITEMS, make_env  # noqa: E402

from agents.registry import canonical_name, kind_of_file, make_policy  # noqa: E402
from agents.rollout import rollout  # noqa: E402
from agents.static import StaticSchedulePolicy, block_progress, position_bin  # noqa: E402

NAMES = ("entropy", "progress")
MENU = (2, (4, 2), 4, 8)


def test_position_bins_split_blocks_by_their_end_position():
    assert position_bin(block_progress(4), 2).tolist() == [0, 0, 1, 1]
    assert position_bin(block_progress(3), 2).tolist() == [0, 1, 1]
    assert position_bin(block_progress(6), 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert position_bin(block_progress(1), 4).tolist() == [3]
    assert position_bin(block_progress(7), 1).tolist() == [0] * 7


def test_policy_plays_its_bin_setting():
    policy = StaticSchedulePolicy(NAMES, MENU, ["k4v2", 2, "8"])
    obs = np.array([[5.0, 0.2], [0.0, 0.33], [1.0, 0.66], [2.0, 0.67], [3.0, 1.0]], dtype=np.float32)
    action, _ = policy.predict(obs)
    assert action.tolist() == [1, 1, 0, 3, 3]
    single, _ = policy.predict(obs[0])
    assert single.shape == () and int(single) == 1
    assert policy.actions_for(3) == [1, 0, 3]


def test_json_round_trip_and_registry(tmp_path):
    policy = StaticSchedulePolicy(NAMES, MENU, ["k4v2", "2"], budget=3.0, log=[{"stage": "start"}],
                                  meta={"objective": -1.5})
    path = policy.save(tmp_path / "schedule.json")
    doc = json.loads(path.read_text())
    assert doc["bits"] == ["2", "k4v2", "4", "8"] and doc["bins"] == 2 and doc["budget"] == 3.0
    assert doc["schedule"] == [["k4v2"], ["2"]] and doc["log"] == [{"stage": "start"}] and doc["objective"] == -1.5
    for spec in (f"static:{path}", str(path)):
        loaded = make_policy(spec, NAMES, MENU)
        assert isinstance(loaded, StaticSchedulePolicy) and loaded.name == "static"
        assert loaded.table.tolist() == policy.table.tolist() and loaded.budget == 3.0 and loaded.meta == {"objective": -1.5}
    assert canonical_name(f"static:{path}") == "static" and canonical_name(f"s3=static:{path}") == "s3"
    assert kind_of_file(path) == "static"
    # on an env whose menu lists the settings in another order, the schedule still names the same settings
    other = make_policy(f"static:{path}", NAMES, (8, 4, 2, (4, 2)))
    assert [other.bits[a] for a in other.actions_for(2)] == [(4, 2), 2]


def test_bad_schedules_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        StaticSchedulePolicy(NAMES, (2, 4), ["k4v2"])
    with pytest.raises(ValueError, match="progress"):
        StaticSchedulePolicy(("entropy",), MENU, ["2"])
    with pytest.raises(ValueError, match="same number"):
        StaticSchedulePolicy(NAMES, MENU, [["2", "4"], ["2"]])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schedule": [["2"]]}))
    with pytest.raises(ValueError, match="not a static schedule"):
        make_policy(f"static:{bad}", NAMES, MENU)
    with pytest.raises(FileNotFoundError):
        make_policy(f"static:{tmp_path / 'missing.json'}", NAMES, MENU)
    with pytest.raises(ValueError, match="needs an argument"):
        make_policy("static", NAMES, MENU)


def test_layer_group_schedule():
    policy = StaticSchedulePolicy(NAMES, MENU, [["2", "8"], ["4", "k4v2"]])
    policy.set_layer_groups(2)
    action, _ = policy.predict(np.array([0.0, 0.5], dtype=np.float32))
    assert action.tolist() == [0, 3]
    assert policy.actions_for(2) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="layer_groups=3"):
        policy.set_layer_groups(3)
    one = StaticSchedulePolicy(NAMES, MENU, ["2", "4"])  # one setting per bin: every group gets it
    one.set_layer_groups(2)
    assert one.actions_for(2) == [[0, 0], [2, 2]]


def test_rollout_plays_actions_for(tiny_model):
    env = make_env(tiny_model, bits=MENU)
    policy = StaticSchedulePolicy(env.observation_names, env.bits, ["8", "2", "k4v2"])
    episode = rollout(env, policy, options={"row": ITEMS[3].row})
    assert episode.actions == policy.actions_for(episode.reset_info["blocks"])
    assert len(set(episode.actions)) == 3
    env.close()

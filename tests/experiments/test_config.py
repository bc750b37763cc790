"""experiments.config: YAML + overrides -> nested typed dataclasses, loud on typos."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from experiments.config import ConfigError, config_to_dict, load_config, parse_config, save_config


@dataclass
class EnvCfg:
    shots: int = 5
    interval: int = 64
    bits: tuple[int, ...] = (2, 4, 8, 16)
    split: str = "val"


@dataclass
class TrainCfg:
    lr: float = 3e-4
    use_gpu: bool = False
    weights: dict[str, float] = field(default_factory=lambda: {"loglik": 1.0, "latency": 0.1})
    features: list[str] = field(default_factory=lambda: ["entropy_mean"])
    checkpoint: str | None = None


@dataclass
class Cfg:
    seed: int = 0
    name: str = "run"
    env: EnvCfg = field(default_factory=EnvCfg)
    train: TrainCfg = field(default_factory=TrainCfg)


def _yaml(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_without_file():
    assert load_config(Cfg, None) == Cfg()


def test_yaml_nested_partial_keeps_other_defaults(tmp_path):
    cfg = load_config(Cfg, _yaml(tmp_path, {"seed": 3, "env": {"shots": 10, "bits": [4, 8]}}))
    assert cfg.seed == 3
    assert cfg.env.shots == 10 and cfg.env.interval == 64
    assert cfg.env.bits == (4, 8) and isinstance(cfg.env.bits, tuple)
    assert cfg.train == TrainCfg()


def test_overrides_coerce_types_and_win_over_yaml(tmp_path):
    path = _yaml(tmp_path, {"env": {"shots": 10}, "train": {"lr": 0.1}})
    cfg = load_config(Cfg, path, [
        "env.shots=3", "train.lr=1e-3", "train.use_gpu=true", "env.bits=[2,16]", "train.features=[a, b]",
        "train.weights.latency=0.5", "name=yes", "train.checkpoint=ckpt.zip", "seed=7.0",
    ])
    assert cfg.env.shots == 3 and type(cfg.env.shots) is int
    assert cfg.train.lr == pytest.approx(1e-3) and type(cfg.train.lr) is float
    assert cfg.train.use_gpu is True
    assert cfg.env.bits == (2, 16)
    assert cfg.train.features == ["a", "b"]
    # a dict entry override updates the dict rather than replacing it
    assert cfg.train.weights == {"loglik": 1.0, "latency": 0.5}
    assert cfg.name == "yes"  # str fields keep the raw text instead of YAML's boolean
    assert cfg.train.checkpoint == "ckpt.zip"
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert load_config(Cfg, None, ["train.checkpoint=null"]).train.checkpoint is None
    assert load_config(Cfg, None, ["env.bits=2,4"]).env.bits == (2, 4)
    assert load_config(Cfg, None, ["train.lr=1"]).train.lr == 1.0


def test_unknown_key_in_yaml_names_key_and_known_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(Cfg, _yaml(tmp_path, {"env": {"shotz": 3}}))
    msg = str(exc.value)
    assert "'env.shotz'" in msg and "known keys in env: shots, interval, bits, split" in msg
    assert "did you mean 'env.shots'" in msg


def test_unknown_key_in_override_names_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*known keys at top level: seed, name, env, train"):
        load_config(Cfg, None, ["trian.lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.weights.x'|unknown config key 'env.nope'"):
        load_config(Cfg, None, ["env.nope=1"])


@pytest.mark.parametrize("override, match", [
    ("env.shots=abc", "env.shots' expects int"),
    ("env.shots=2.5", "env.shots' expects int"),
    ("train.use_gpu=maybe", "train.use_gpu' expects bool"),
    ("train.lr=true", "train.lr' expects float"),
    ("env.bits=[2, x]", r"env.bits\[1\]' expects int"),
    ("env=3", "section 'env' must be a mapping"),
    ("noequals", "KEY=VALUE"),
])
def test_bad_override_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Cfg, None, [override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_required_field_missing():
    @dataclass
    class Req:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match="missing required config key.*path"):
        load_config(Req, None)
    assert load_config(Req, None, ["path=x"]).path == "x"


def test_save_load_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["env.bits=[2,4]", "train.weights.extra=2", "train.checkpoint=c"])
    out = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert out.is_file() and not list(out.parent.glob(".*tmp"))
    assert yaml.safe_load(out.read_text())["env"]["bits"] == [2, 4]
    assert load_config(Cfg, out) == cfg
    assert config_to_dict(cfg)["train"]["weights"] == {"loglik": 1.0, "latency": 0.1, "extra": 2.0}


def test_parse_config_cli(tmp_path, capsys):
    path = _yaml(tmp_path, {"env": {"shots": 1}})
    cfg, args = parse_config(Cfg, ["--config", str(path), "--set", "env.interval=32", "--set", "seed=4"])
    assert (cfg.env.shots, cfg.env.interval, cfg.seed) == (1, 32, 4)
    assert args.overrides == ["env.interval=32", "seed=4"]
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"], description="demo")
    help_text = capsys.readouterr().out
    assert "--set KEY=VALUE" in help_text and "env.shots: int = 5" in help_text
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--set", "env.shotz=1"])
    assert "unknown config key 'env.shotz'" in capsys.readouterr().err


def test_literal_and_optional_section():
    @dataclass
    class Algo:
        name: Literal["ppo", "a2c"] = "ppo"
        env: EnvCfg | None = None

    cfg = load_config(Algo, None, ["name=a2c", "env.shots=2"])
    assert cfg.name == "a2c" and cfg.env == EnvCfg(shots=2)
    with pytest.raises(ConfigError, match=r"must be one of \['ppo', 'a2c'\]"):
        load_config(Algo, None, ["name=dqn"])

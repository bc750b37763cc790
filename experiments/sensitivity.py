"""Per-block and per-layer-group sensitivity: what low bits cost where, and what predicts it.

    python -m experiments.sensitivity --set items=10 --set out=runs/sensitivity.json
    python -m experiments.sensitivity --set mode=layers --set env.layer_groups=5 --set out=runs/sens_layers.json

A policy can only save bits well if the damage a block takes at low precision differs from block to
block *and* can be told from what the policy sees. This measures both, on pool items (never the
held-out ones), before anyone spends hours training an agent:

1. for each item (with its fixed shots) run the episode with every block at ``base_bits``;
2. for every block ``j`` run it again with only block ``j`` at ``low_bits``;
3. the block's *damage* is the change of the gold ending's log-likelihood between the two
   (the reward's own signal, in nats; negative = worse), and its observation is the one the policy
   saw when it chose block ``j``'s bits in the base episode.

It prints the mean damage per block position and the Spearman correlation of every observation
entry with the damage (all blocks, and without block 0), and writes every measurement to ``out``.
Cost: ``items x (blocks + 1)`` episodes (~30 s per 5-shot item on 2 CPU cores).

``mode=layers`` asks where in the *model* low bits hurt, and in which half of the cache, so a layer
prior (KVTuner keeps early layers high) is measured, not guessed. With ``env.layer_groups = G``:

1. for each item run the episode with every block, in every layer group, at ``base_bits``;
2. for every group ``g`` run it again with group ``g``'s *keys* at ``low_bits`` for every block of
   the prompt (values and other groups at ``base_bits``), and once more with its *values* low;
3. the damage is again the change of the gold ending's log-likelihood against the base episode.

It prints the mean damage (95% CI) per group for keys and for values and writes every measurement.
Cost: ``items x (2G + 1)`` episodes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.rollout import Schedule, rollout
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.settings import normalize_setting, setting_name
from experiments.config import parse_config, save_config
from experiments.io import write_json
from experiments.stats import mean_ci, spearman
from quant.kv_cache import bit_pair

MODES = ("blocks", "layers")
HALVES = ("keys", "values")


@dataclass
class SensitivityConfig:
    env: EnvConfig = field(default_factory=lambda: EnvConfig(split="train"))  # pool items only
    items: int = 10  # the first N items of the pool
    # "blocks": one block at a time at low_bits; "layers": one layer group's keys, or values, at a
    # time at low_bits for the whole prompt (env.layer_groups groups; the env's menu is set for it)
    mode: str = "blocks"
    base_bits: int = 4  # every other block's (layers: group's) width (4 bits is near-lossless on SmolLM2)
    low_bits: int = 2  # the width whose cost is measured, one block (or one group's half) at a time
    out: str = "runs/sensitivity.json"
    threads: int | None = None  # torch CPU threads (None = torch's default)
    progress: bool = True


def run_schedule(env: KVPrecisionEnv, row: int, bits: Sequence[int] | int) -> tuple[dict, list[np.ndarray]]:
    """One episode of row ``row`` with block ``i`` committed at ``bits[i]`` (an int: every block).

    Returns the terminal ``info`` and the observation seen before each decision."""
    blocks = _blocks(env, row)
    widths = [bits] * blocks if isinstance(bits, int) else list(bits)
    if len(widths) != blocks:
        raise ValueError(f"row {row} has {blocks} blocks, the schedule {len(widths)}")
    episode = rollout(env, Schedule([env.bits.index(b) for b in widths]), options={"row": row})
    return episode.final_info, episode.observations


def _blocks(env: KVPrecisionEnv, row: int) -> int:
    return math.ceil(len(env.episode_inputs(row)[1]) / env.config.interval)


def run_group_settings(env: KVPrecisionEnv, row: int, settings: Sequence) -> dict:
    """One episode of row ``row`` with every block of layer group ``g`` at ``settings[g]``; its final info."""
    action = [env.bits.index(normalize_setting(s)) for s in settings]
    episode = rollout(env, Schedule([action] * _blocks(env, row)), options={"row": row})
    return episode.final_info


def lowered(base: int, low: int, half: str):
    """``base`` with its keys (``half="keys"``) or values at ``low`` bits, as a setting."""
    k, v = bit_pair(base)
    return normalize_setting((low, v) if half == "keys" else (k, low))


def layer_menu(base: int, low: int) -> tuple:
    """The env menu mode=layers needs: the base setting and its keys-low and values-low variants."""
    return tuple(dict.fromkeys(normalize_setting(s) for s in (base, *(lowered(base, low, h) for h in HALVES))))


def run_layers(cfg: SensitivityConfig, env: KVPrecisionEnv) -> dict:
    """mode=layers (module doc): damage of one group's keys or values at ``low_bits``, per item."""
    groups = env.config.layer_groups
    measurements = []
    for item in tqdm(env.items[: cfg.items], desc="sensitivity (layers)", unit="item", disable=not cfg.progress):
        base = run_group_settings(env, item.row, [cfg.base_bits] * groups)
        for g in range(groups):
            for half in HALVES:
                settings = [cfg.base_bits] * groups
                settings[g] = lowered(cfg.base_bits, cfg.low_bits, half)
                info = run_group_settings(env, item.row, settings)
                measurements.append({"row": item.row, "group": g, "half": half,
                                     "setting": setting_name(settings[g]),
                                     "damage": info["loglik_delta"] - base["loglik_delta"]})
    layers = env.model.config.get_text_config(decoder=True).num_hidden_layers
    size = layers // groups
    by_group = {
        g: {"layers": [g * size, (g + 1) * size],
            **{half: mean_ci(m["damage"] for m in measurements if m["group"] == g and m["half"] == half).as_dict()
               for half in HALVES}}
        for g in range(groups)
    }
    return {"mode": "layers", "layer_groups": groups, "damage_by_group": by_group, "measurements": measurements}


def analyse(blocks: list[dict], names: Sequence[str]) -> dict:
    """Mean damage by block position and each observation entry's Spearman correlation with damage."""
    damage = np.array([b["damage"] for b in blocks])
    position = np.array([b["block"] for b in blocks])
    obs = np.array([b["obs"] for b in blocks])
    later = position > 0
    return {
        "blocks": len(blocks),
        "damage_by_position": {int(p): float(damage[position == p].mean()) for p in np.unique(position)},
        "spearman": {
            name: {"all": spearman(obs[:, i], damage), "after_block_0": spearman(obs[later, i], damage[later])}
            for i, name in enumerate(names)
        },
    }


def run(cfg: SensitivityConfig) -> dict:
    if cfg.items < 1:
        raise ValueError(f"items must be >= 1, got {cfg.items}")
    if cfg.env.split != "train":
        raise ValueError("sensitivity is measured on pool items (env.split=train), never on held-out ones")
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.mode == "layers":
        env = KVPrecisionEnv(dataclasses.replace(cfg.env, bits=layer_menu(cfg.base_bits, cfg.low_bits)))
        save_config(cfg, f"{cfg.out}.config.yaml")
        try:
            result = run_layers(cfg, env)
        finally:
            env.close()
        write_json(cfg.out, result)
        return result
    env = KVPrecisionEnv(cfg.env)
    for b in (cfg.base_bits, cfg.low_bits):
        if b not in env.bits:
            raise ValueError(f"{b} bits is not in the env's menu {env.bits}")
    save_config(cfg, f"{cfg.out}.config.yaml")
    blocks: list[dict] = []
    try:
        for item in tqdm(env.items[: cfg.items], desc="sensitivity", unit="item", disable=not cfg.progress):
            base, seen = run_schedule(env, item.row, cfg.base_bits)
            for j, obs in enumerate(seen):
                widths = [cfg.low_bits if i == j else cfg.base_bits for i in range(len(seen))]
                info, _ = run_schedule(env, item.row, widths)
                blocks.append({"row": item.row, "block": j, "blocks": len(seen), "obs": obs.tolist(),
                               "damage": info["loglik_delta"] - base["loglik_delta"]})
        names = list(env.observation_names)
    finally:
        env.close()
    result = {"mode": "blocks", "observation_names": names, **analyse(blocks, names), "measurements": blocks}
    write_json(cfg.out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(SensitivityConfig, argv, description=__doc__)
    result = run(cfg)
    if cfg.mode == "layers":
        print(f"mean damage (nats, 95% CI) of one layer group's keys or values at {cfg.low_bits} bits "
              f"(the rest at {cfg.base_bits}), {cfg.items} items:")
        for g, entry in result["damage_by_group"].items():
            cells = "   ".join(f"{h} {entry[h]['mean']:+.2f} [{entry[h]['lo']:+.2f}, {entry[h]['hi']:+.2f}]"
                               for h in HALVES)
            print(f"  group {g} (layers {entry['layers'][0]}-{entry['layers'][1] - 1}): {cells}")
        print(f"written: {cfg.out}")
        return 0
    print(f"{result['blocks']} blocks; mean damage (nats) of one block at {cfg.low_bits} bits, by position:")
    print("  " + "  ".join(f"{p}: {d:+.2f}" for p, d in result["damage_by_position"].items()))
    print("Spearman correlation with the damage (negative: a higher value goes with more damage):")
    for name, rho in result["spearman"].items():
        print(f"  {name:16s} all blocks {rho['all']:+.2f}   after block 0 {rho['after_block_0']:+.2f}")
    print(f"written: {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

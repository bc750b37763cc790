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

It prints the mean damage per block position and the Spearman correlation (scipy.stats) of every
observation entry of the configured ``env.features`` with the damage (all blocks, and without block
0), each with a 95% interval, and writes every measurement to ``out``.
Cost: ``items x (blocks x (1 + len(extra_low)) + 1)`` episodes (~30 s per 5-shot item on 2 CPU cores).

Noise. The min-max quantizer amplifies last-bit float differences: the same episode re-run on
another machine moves an item's log-likelihood by 1.6 nats on average at fixed-2, so one block's
damage measured once is a noisy target, and part of it no observation can predict. Two things
handle that here: (a) with ``extra_low`` (e.g. ``[k4v2, k2v4]``) the block is also lowered to each
of those settings and its target is the *mean* damage over all of them; each perturbs the block's
numbers differently, so the chaotic part averages down while the block's real sensitivity stays
(every setting's own damage is kept under ``damages``, and ``setting_agreement`` is the Spearman
between the first two settings' damages: a ceiling on what any feature can reach); (b) every
Spearman carries a 95% percentile-bootstrap interval that resamples *items* (``bootstrap``
resamples, blocks of one item stay together, since they share the item's shots and noise), so a
feature is only called predictive when its interval excludes 0.

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from agents.rollout import Schedule, rollout
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.settings import Setting, normalize_setting, setting_name
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
    # mode=blocks: further settings to lower each block to (names such as k4v2, or widths); the block's
    # damage is then the mean over low_bits and these, which averages out the quantizer's chaos (doc)
    extra_low: tuple[Any, ...] = ()
    bootstrap: int = 1000  # item resamples behind each Spearman's 95% interval (0: no interval)
    seed: int = 0  # of the bootstrap
    out: str = "runs/sensitivity.json"
    threads: int | None = None  # torch CPU threads (None = torch's default)
    progress: bool = True


def run_schedule(env: KVPrecisionEnv, row: int, bits: Sequence[Setting] | Setting) -> tuple[dict, list[np.ndarray]]:
    """One episode of row ``row`` with block ``i`` committed at ``bits[i]`` (one setting: every block).

    Returns the terminal ``info`` and the observation seen before each decision."""
    blocks = _blocks(env, row)
    widths = [bits] * blocks if isinstance(bits, (int, str)) or _is_pair(bits) else list(bits)
    if len(widths) != blocks:
        raise ValueError(f"row {row} has {blocks} blocks, the schedule {len(widths)}")
    episode = rollout(env, Schedule([env.bits.index(normalize_setting(b)) for b in widths]), options={"row": row})
    return episode.final_info, episode.observations


def _is_pair(bits: Any) -> bool:
    """A (key_bits, value_bits) setting, as opposed to a schedule of settings."""
    return isinstance(bits, tuple) and len(bits) == 2 and all(isinstance(b, int) for b in bits)


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


def _rank_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of every column of ``x`` [N, F] with ``y`` [N] at once (average ranks for ties, as
    scipy.stats.spearmanr); nan for a constant column or fewer than 3 rows."""
    if len(y) < 3:
        return np.full(x.shape[1], np.nan)
    rx = stats.rankdata(x, axis=0)
    ry = stats.rankdata(y)
    rx = rx - rx.mean(axis=0)
    ry = ry - ry.mean()
    denom = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry[:, None]).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman_with_ci(
    obs: np.ndarray, damage: np.ndarray, items: np.ndarray, resamples: int, rng: np.random.Generator
) -> list[dict[str, float]]:
    """Per column of ``obs``: its Spearman with ``damage`` (scipy.stats) and a 95% percentile-bootstrap
    interval over *items* (each resample draws items with replacement and keeps all their blocks).
    ``lo``/``hi`` are nan without resamples, or when fewer than half the resamples give a number."""
    rho = [spearman(obs[:, i], damage) for i in range(obs.shape[1])]
    unique = np.unique(items)
    members = [np.flatnonzero(items == u) for u in unique]
    draws = np.empty((resamples, obs.shape[1]))
    for b in range(resamples):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(unique), len(unique))])
        draws[b] = _rank_correlations(obs[rows], damage[rows])
    out = []
    for i, r in enumerate(rho):
        finite = draws[np.isfinite(draws[:, i]), i]
        if resamples and len(finite) >= resamples / 2:
            lo, hi = np.percentile(finite, [2.5, 97.5])
        else:
            lo = hi = float("nan")
        out.append({"rho": r, "lo": float(lo), "hi": float(hi)})
    return out


def analyse(blocks: list[dict], names: Sequence[str], resamples: int = 1000, seed: int = 0) -> dict:
    """Mean damage by block position and each observation entry's Spearman correlation with damage
    (all blocks, and blocks after block 0), each with its 95% bootstrap interval over items."""
    damage = np.array([b["damage"] for b in blocks])
    position = np.array([b["block"] for b in blocks])
    items = np.array([b["row"] for b in blocks])
    obs = np.array([b["obs"] for b in blocks]).reshape(len(blocks), len(names))
    later = position > 0
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # constant columns (sink without sinks) are an expected nan
        warnings.simplefilter("ignore", RuntimeWarning)
        every = spearman_with_ci(obs, damage, items, resamples, rng)
        after = spearman_with_ci(obs[later], damage[later], items[later], resamples, rng)
    result = {
        "blocks": len(blocks),
        "items": len(np.unique(items)),
        "damage_by_position": {int(p): float(damage[position == p].mean()) for p in np.unique(position)},
        "spearman": {
            name: {"all": a["rho"], "all_ci": [a["lo"], a["hi"]],
                   "after_block_0": z["rho"], "after_block_0_ci": [z["lo"], z["hi"]]}
            for name, a, z in zip(names, every, after, strict=True)
        },
    }
    settings = list(blocks[0].get("damages", {})) if blocks else []
    if len(settings) >= 2:
        first, second = ([b["damages"][s] for b in blocks] for s in settings[:2])
        result["setting_agreement"] = {"settings": settings[:2], "spearman": spearman(first, second)}
    return result


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
        if cfg.extra_low:
            raise ValueError("extra_low is for mode=blocks; mode=layers lowers keys or values to low_bits")
        env = KVPrecisionEnv(dataclasses.replace(cfg.env, bits=layer_menu(cfg.base_bits, cfg.low_bits)))
        save_config(cfg, f"{cfg.out}.config.yaml")
        try:
            result = run_layers(cfg, env)
        finally:
            env.close()
        write_json(cfg.out, result)
        return result
    if cfg.bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {cfg.bootstrap}")
    env = KVPrecisionEnv(cfg.env)
    lows = list(dict.fromkeys(normalize_setting(b) for b in (cfg.low_bits, *cfg.extra_low)))
    for b in (normalize_setting(cfg.base_bits), *lows):
        if b not in env.bits:
            env.close()
            raise ValueError(f"{setting_name(b)} bits is not in the env's menu {env.bits}")
    save_config(cfg, f"{cfg.out}.config.yaml")
    blocks: list[dict] = []
    try:
        for item in tqdm(env.items[: cfg.items], desc="sensitivity", unit="item", disable=not cfg.progress):
            base, seen = run_schedule(env, item.row, cfg.base_bits)
            for j, obs in enumerate(seen):
                damages = {}
                for low in lows:
                    widths = [low if i == j else cfg.base_bits for i in range(len(seen))]
                    info, _ = run_schedule(env, item.row, widths)
                    damages[setting_name(low)] = info["loglik_delta"] - base["loglik_delta"]
                entry = {"row": item.row, "block": j, "blocks": len(seen), "obs": obs.tolist(),
                         "damage": float(np.mean(list(damages.values())))}
                if len(lows) > 1:
                    entry["damages"] = damages
                blocks.append(entry)
        names = list(env.observation_names)
    finally:
        env.close()
    result = {"mode": "blocks", "observation_names": names, "low_settings": [setting_name(b) for b in lows],
              **analyse(blocks, names, cfg.bootstrap, cfg.seed), "measurements": blocks}
    write_json(cfg.out, result)
    return result


def _cell(rho: float, ci: Sequence[float]) -> str:
    return f"{rho:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


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
    lows = "/".join(result["low_settings"])
    print(f"{result['blocks']} blocks of {result['items']} items; mean damage (nats) of one block at {lows} "
          f"(averaged over those settings), by position:")
    print("  " + "  ".join(f"{p}: {d:+.2f}" for p, d in result["damage_by_position"].items()))
    if "setting_agreement" in result:
        agree = result["setting_agreement"]
        print(f"Spearman between the damages at {' and '.join(agree['settings'])}: {agree['spearman']:+.2f}")
    print("Spearman correlation with the damage (negative: a higher value goes with more damage), "
          "95% bootstrap interval over items:")
    width = max(map(len, result["spearman"]), default=0)
    for name, rho in result["spearman"].items():
        print(f"  {name:{width}s} all blocks {_cell(rho['all'], rho['all_ci'])}   "
              f"after block 0 {_cell(rho['after_block_0'], rho['after_block_0_ci'])}")
    print(f"written: {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train PPO (or any stable-baselines3 algorithm, by name) on KVPrecision-v0's train split.

    python -m experiments.train_ppo --config experiments/configs/train_ppo.yaml
    python -m experiments.train_ppo --config experiments/configs/train_ppo.yaml --set resume=true

Writes ``<out_dir>/<algo>.zip`` (``ppo.zip`` by default; load it with ``sb3:<out_dir>/ppo.zip``),
checkpoints ``<out_dir>/checkpoints/<algo>_<steps>_steps.zip`` every ``checkpoint_every`` steps (and on
Ctrl-C), TensorBoard logs in ``<out_dir>/tb`` (synced into the wandb run) and ``config.yaml``.

Choices:
- No VecNormalize: observations are unit-scaled by construction (entropy/rarity in nats, the rest in
  [0, 1]), and a normaliser would be one more artifact that evaluation must load and apply.
- ``resume=true`` loads the newest checkpoint and continues to ``total_timesteps`` (the step counter and
  the TensorBoard curve continue too); hyperparameters come from the checkpoint, and resuming with a
  different env or algorithm is refused. ``resume=false`` starts over: checkpoints of the earlier run in
  this ``out_dir`` are deleted first, so a later resume never picks them up. Off-policy algorithms resume
  with an empty replay buffer.
- ``eval_freq > 0`` adds an EvalCallback on a separate env over the *train* split, re-seeded with
  ``eval_seed`` before every evaluation, so each evaluation sees the same few items: a comparable training
  curve, not a held-out score (``experiments.evaluate`` measures that on the eval split).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
import wandb
import yaml
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env

from agents.sb3 import resolve_algorithm
from envs import ENV_ID
from envs.io import atomic_write
from envs.kv_precision import EnvConfig
from experiments import tracking
from experiments.config import config_to_dict, parse_config, save_config

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"_(\d+)_steps\.zip$")
#: Keys a resumed run must share with the run that wrote the checkpoints.
_RESUME_KEYS = ("env", "algo", "policy")


@dataclass
class TrainPPOConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # split must stay "train"
    algo: str = "PPO"  # any stable-baselines3 algorithm with a Discrete action space (PPO, A2C, DQN)
    policy: str = "MlpPolicy"
    # Constructor kwargs of the algorithm (replace them wholesale in YAML when changing algo).
    algo_kwargs: dict[str, Any] = field(default_factory=lambda: {"n_steps": 256, "batch_size": 64})
    total_timesteps: int = 20_000  # env steps (one per KV block)
    n_envs: int = 1  # DummyVecEnv copies; they share one loaded model in-process
    checkpoint_every: int = 1_000  # env steps between checkpoints (0 disables)
    eval_freq: int = 0  # env steps between evaluations on fixed train items (0 disables)
    eval_episodes: int = 5
    eval_seed: int = 12345
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None = torch's default; 1 is fastest on a busy machine)
    seed: int = 0
    out_dir: str = "runs/train_ppo"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


class AtomicCheckpointCallback(CheckpointCallback):
    """CheckpointCallback whose zip files appear whole or not at all (a kill mid-save leaves no stub)."""

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            path = Path(self._checkpoint_path(extension="zip"))
            atomic_write(path, self.model.save)
            if self.verbose >= 2:
                print(f"Saving model checkpoint to {path}")
        return True


class FixedSeedEvalCallback(EvalCallback):
    """EvalCallback that re-seeds its env before every evaluation, so all evaluations use the same items."""

    def __init__(self, *args, eval_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seed = eval_seed

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            self.eval_env.seed(self.eval_seed)
        return super()._on_step()


def checkpoints(directory: Path) -> list[Path]:
    """``*_<steps>_steps.zip`` files in ``directory``, oldest (fewest steps) first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("*_steps.zip") if (m := _CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def _init_run(cfg: TrainPPOConfig, out_dir: Path, tb_dir: Path):
    """A wandb run that also picks up SB3's TensorBoard scalars."""
    kwargs = dict(project=cfg.wandb_project, group=cfg.wandb_group, name=f"train_{cfg.algo.lower()}",
                  config=cfg, job_type="train", dir=out_dir)
    patched = os.environ.setdefault("WANDB_MODE", "offline") != "disabled"
    if patched:  # what wandb.init(sync_tensorboard=True) does: SB3's scalars reach the wandb run
        wandb.tensorboard.patch(root_logdir=str(tb_dir))
    return tracking.init_run(**kwargs), patched


def _check_resumable(cfg: TrainPPOConfig, out_dir: Path) -> None:
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved, now = yaml.safe_load(saved_path.read_text()) or {}, config_to_dict(cfg)
    changed = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(
            f"cannot resume in {out_dir}: {changed} differ from the run that wrote its checkpoints "
            f"({saved_path}); use --set resume=false to start over or choose another out_dir"
        )


def run(cfg: TrainPPOConfig) -> dict[str, Path]:
    """Train (or continue training) and save the final model; returns the paths written."""
    if cfg.env.split != "train":
        raise ValueError(f"train_ppo trains on the train split only (got env.split={cfg.env.split!r}); set env.split=train")
    if cfg.total_timesteps < 1 or cfg.n_envs < 1:
        raise ValueError(f"total_timesteps and n_envs must be >= 1, got {cfg.total_timesteps} and {cfg.n_envs}")
    algo_cls = resolve_algorithm(cfg.algo)
    out_dir = Path(cfg.out_dir)
    ckpt_dir, tb_dir = out_dir / CHECKPOINT_DIR, out_dir / "tb"
    existing = checkpoints(ckpt_dir)
    if cfg.resume and existing:
        _check_resumable(cfg, out_dir)
    elif existing:
        print(f"resume=false: removing {len(existing)} checkpoint(s) of an earlier run in {ckpt_dir}")
        for p in existing:
            p.unlink()
    paths: dict[str, Path] = {"config": save_config(cfg, out_dir / "config.yaml"), "checkpoints": ckpt_dir,
                              "tensorboard": tb_dir}

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # A factory rather than the id: make_vec_env would pass render_mode="rgb_array", which the env lacks.
    make_env = partial(gym.make, ENV_ID, config=cfg.env)
    venv = make_vec_env(make_env, n_envs=cfg.n_envs, seed=cfg.seed)
    eval_env = None
    wb, patched = _init_run(cfg, out_dir, tb_dir)
    try:
        if cfg.resume and existing:
            latest = existing[-1]
            model = algo_cls.load(latest, env=venv, device=cfg.device, tensorboard_log=str(tb_dir))
            print(f"resuming from {latest} ({model.num_timesteps} steps done of {cfg.total_timesteps})")
        else:
            if cfg.resume:
                print(f"resume=true but no checkpoint in {ckpt_dir}: starting from scratch")
            try:
                model = algo_cls(cfg.policy, venv, seed=cfg.seed, device=cfg.device, tensorboard_log=str(tb_dir),
                                 verbose=0, **cfg.algo_kwargs)
            except TypeError as e:
                raise ValueError(f"algo_kwargs {cfg.algo_kwargs} do not fit {algo_cls.__name__} ({e}); "
                                 "replace algo_kwargs in the YAML when changing algo") from e
        resumed = cfg.resume and bool(existing)

        callbacks = []
        if cfg.checkpoint_every > 0:
            callbacks.append(AtomicCheckpointCallback(max(cfg.checkpoint_every // cfg.n_envs, 1), str(ckpt_dir),
                                                      name_prefix=cfg.algo.lower()))
        if cfg.eval_freq > 0:
            eval_env = make_vec_env(make_env, n_envs=1, seed=cfg.eval_seed)
            callbacks.append(FixedSeedEvalCallback(eval_env, eval_seed=cfg.eval_seed,
                                                   n_eval_episodes=cfg.eval_episodes,
                                                   eval_freq=max(cfg.eval_freq // cfg.n_envs, 1),
                                                   deterministic=True, verbose=0))

        remaining = cfg.total_timesteps - model.num_timesteps
        if remaining > 0:
            try:
                model.learn(remaining, callback=callbacks, reset_num_timesteps=not resumed,
                            tb_log_name=cfg.algo.upper(), progress_bar=cfg.progress)
            except KeyboardInterrupt:
                ckpt = ckpt_dir / f"{cfg.algo.lower()}_{model.num_timesteps}_steps.zip"
                path = atomic_write(ckpt, model.save)
                print(f"\ninterrupted: saved {path}; continue with --set resume=true")
                raise
        else:
            print(f"already trained for {model.num_timesteps} >= total_timesteps={cfg.total_timesteps} steps")
        paths["model"] = atomic_write(out_dir / f"{cfg.algo.lower()}.zip", model.save)
        wb.summary.update({"num_timesteps": int(model.num_timesteps)})
        print(f"{cfg.algo} trained for {model.num_timesteps} steps -> {paths['model']}")
    finally:
        venv.close()
        if eval_env is not None:
            eval_env.close()
        tracking.finish(wb, announce=True)
        if patched:
            wandb.tensorboard.unpatch()
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg, _ = parse_config(TrainPPOConfig, argv, description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()

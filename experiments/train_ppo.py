"""Train PPO, MaskablePPO (or any stable-baselines3 / sb3-contrib algorithm, by name) on KVPrecision-v0's train split.

    python -m experiments.train_ppo --config experiments/configs/train_ppo.yaml
    python -m experiments.train_ppo --config experiments/configs/train_ppo.yaml --set resume=true

Writes ``<out_dir>/<algo>.zip`` (``ppo.zip`` by default; load it with ``sb3:<out_dir>/ppo.zip``, or
``sb3:MaskablePPO:<out_dir>/maskableppo.zip``), checkpoints ``<out_dir>/checkpoints/<algo>_<steps>_steps.zip``
every ``checkpoint_every`` steps (and on Ctrl-C), the learning curve ``<out_dir>/learning_curve.csv`` (and in
the wandb run; see ``experiments.learning_curve``), TensorBoard logs in ``<out_dir>/tb`` (synced into the wandb
run) and ``config.yaml``.

Choices:
- ``algo: MaskablePPO`` (sb3-contrib) acts under the env's bit budget: at every step it reads the env's
  ``action_masks()`` (sb3-contrib's convention, through the vector env's ``env_method``) and samples only
  settings that keep the budget reachable, so it never has to learn the budget from the env's fallback.
- ``normalize_reward`` (default on): rewards reach the learner through SB3's ``VecNormalize(norm_obs=False,
  norm_reward=True)``, i.e. divided by a running std of the discounted return, clipped at ±10. Why: the
  last PPO run's critic never learned a return scale of ~190 (value loss 17,885, explained variance ~0), and
  since SB3 clips the gradient norm of the *summed* policy + value loss (max_grad_norm 0.5), a huge value
  loss also shrinks the policy's step to almost nothing. PPO normalises advantages per batch but not the
  critic's targets. A fixed ``reward_scale`` was the alternative; it was rejected because the right constant
  depends on the reward terms, the budget, the baseline setting and the model (per-item damage spreads from
  ~0.2 nats at 4 bits to ~1.6 at 2 bits), so it would need re-tuning with every config, while the running
  std adapts to each. Training only: observations are not normalised, so evaluation loads the bare model
  and needs no normaliser. The statistics are saved next to each checkpoint
  (``<algo>_vecnormalize_<steps>_steps.pkl``) so a resumed run continues on the same scale. The learning
  curve reports raw (unnormalised) returns; SB3's ``train/value_loss`` is on the normalised scale.
- No observation normaliser: observations are unit-scaled by construction (entropy/rarity in nats, the rest
  in [0, 1]), and a normaliser would be one more artifact that evaluation must load and apply.
- ``resume=true`` loads the newest checkpoint and continues to ``total_timesteps`` (the step counter, the
  TensorBoard curve and the learning-curve CSV continue too); hyperparameters come from the checkpoint, and
  resuming with a different env, algorithm or reward normalisation is refused. ``resume=false`` starts over:
  checkpoints of the earlier run in this ``out_dir`` are deleted first, so a later resume never picks them
  up. Off-policy algorithms resume with an empty replay buffer.
- ``warm_start: <policy spec>`` (e.g. ``static:results/study_v2/search/schedule_b3.0.json``) starts a fresh run
  from a copy of that teacher: ``warm_start_episodes`` teacher episodes on the training env (its episode set,
  seeds ``seed, seed+1, ...``) and ``warm_start_epochs`` of maximum likelihood on their actions, under the masks
  the env gave (``agents.sb3.behaviour_clone``); PPO then improves on the teacher instead of first relearning
  it. The teacher's agreement and loss go to the wandb summary. A resumed run ignores it (the checkpoint has it).
- ``reference_policy: <policy spec>`` (e.g. the static schedule) trains on the env's reward minus that policy's
  return on the same episode (``agents.reference_return``: a self-critical baseline, computed once per episode
  of the env's episode set). Playing the reference's actions then earns exactly 0, so the critic no longer has
  to guess each item's difficulty for the reward's baseline setting, and the learning curve's return is the
  gain over the reference on the training episodes.
- ``eval_freq > 0`` adds an EvalCallback (MaskableEvalCallback for MaskablePPO) on a separate env over the
  *train* split, re-seeded with ``eval_seed`` before every evaluation, so each evaluation sees the same few
  items: a comparable training curve, not a held-out score (``experiments.evaluate`` measures that on the
  eval split).
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
import numpy as np
import torch
import wandb
import yaml
from stable_baselines3.common.callbacks import CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecNormalize
from tqdm.auto import tqdm

from agents.oracle import PlanningPolicy
from agents.reference_return import ReferenceReturnWrapper
from agents.registry import make_policy, parse_spec
from agents.rollout import rollout
from agents.sb3 import behaviour_clone, resolve_algorithm
from envs import ENV_ID
from envs.io import atomic_write
from envs.kv_precision import EnvConfig
from experiments import tracking
from experiments.config import config_to_dict, parse_config, save_config
from experiments.learning_curve import CURVE_NAME, LearningCurveCallback, start_curve

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"_(\d+)_steps\.zip$")
#: Keys a resumed run must share with the run that wrote the checkpoints.
_RESUME_KEYS = ("env", "algo", "policy", "normalize_reward")


def _default_algo_kwargs() -> dict[str, Any]:
    """PPO/MaskablePPO defaults for short episodes (~9 blocks of 64 tokens) whose reward comes at the end."""
    return {
        # ~28 episodes per update: a terminal-only reward gives one learning signal per episode, so an
        # update needs many episodes for its advantage estimates (and their per-batch normalisation).
        "n_steps": 256,
        "batch_size": 64,  # 4 minibatches per epoch
        "n_epochs": 10,
        "learning_rate": 3.0e-4,
        # Undiscounted: the episode is short and finite and the reward is terminal; gamma < 1 would only
        # shrink the credit of the early blocks (0.99^9 ~ 0.91) that shape the whole cache.
        "gamma": 1.0,
        # Mostly Monte Carlo: the terminal reward reaches block 0 with weight 0.95^8 ~ 0.66, so an untrained
        # critic biases the advantages little, while the critic still cuts some of the return's noise (the
        # same item's damage differs across machines by 0.17-1.6 nats).
        "gae_lambda": 0.95,
        # Keeps exploring settings (the last run collapsed to "always 4 bits"); relative to per-batch
        # normalised advantages, so independent of the reward's scale.
        "ent_coef": 0.01,
    }


@dataclass
class TrainPPOConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # split must stay "train"
    # Any stable-baselines3 / sb3-contrib algorithm by name: PPO, MaskablePPO (reads env.action_masks()), A2C, DQN
    algo: str = "PPO"
    policy: str = "MlpPolicy"
    # Constructor kwargs of the algorithm (replace them wholesale in YAML when changing to a non-PPO algo).
    algo_kwargs: dict[str, Any] = field(default_factory=_default_algo_kwargs)
    # Rewards reach the learner divided by a running std of the return (training only; see the module doc).
    normalize_reward: bool = True
    total_timesteps: int = 20_000  # env steps (one per KV block)
    n_envs: int = 1  # DummyVecEnv copies; they share one loaded model in-process
    checkpoint_every: int = 1_000  # env steps between checkpoints (0 disables)
    eval_freq: int = 0  # env steps between evaluations on fixed train items (0 disables)
    eval_episodes: int = 5
    eval_seed: int = 12345
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    # a teacher policy spec the fresh model first imitates (see the module doc); None: start from scratch
    warm_start: str | None = None
    warm_start_episodes: int = 64
    warm_start_epochs: int = 300  # ~500 teacher steps: enough passes to copy a position-only schedule (agreement 0.998)
    # a policy spec whose return on the same episode is subtracted from the training reward (see the module doc);
    # None: the env's reward as it is
    reference_policy: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None = torch's default; 1 is fastest on a busy machine)
    seed: int = 0
    out_dir: str = "runs/train_ppo"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


def make_env(config: EnvConfig) -> gym.Env:
    """One training env (a factory rather than the id: make_vec_env would pass render_mode="rgb_array")."""
    return gym.make(ENV_ID, config=config)


def make_training_env(cfg: TrainPPOConfig) -> gym.Env:
    """The env PPO learns on: ``make_env``, behind the reference return when ``reference_policy`` is set."""
    env = make_env(cfg.env)
    if cfg.reference_policy is None:
        return env
    return ReferenceReturnWrapper(env, make_policy(cfg.reference_policy, env=env))


def vecnormalize_path(checkpoint: Path) -> Path:
    """Where the reward normaliser's statistics of ``<algo>_<steps>_steps.zip`` are saved."""
    prefix, steps = _CHECKPOINT_RE.split(checkpoint.name)[:2]
    return checkpoint.with_name(f"{prefix}_vecnormalize_{steps}_steps.pkl")


def save_checkpoint(model: Any, path: Path) -> Path:
    """The model at ``path`` and, when training normalises rewards, its statistics beside it (written first,
    so a checkpoint that exists always has them)."""
    vecnorm = model.get_vec_normalize_env()
    if vecnorm is not None:
        atomic_write(vecnormalize_path(path), vecnorm.save)
    return atomic_write(path, model.save)


class AtomicCheckpointCallback(CheckpointCallback):
    """CheckpointCallback whose zip files appear whole or not at all (a kill mid-save leaves no stub)."""

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            path = save_checkpoint(self.model, Path(self._checkpoint_path(extension="zip")))
            if self.verbose >= 2:
                print(f"Saving model checkpoint to {path}")
        return True


class _FixedSeed:
    """Re-seeds the eval env before every evaluation, so all evaluations use the same items."""

    def __init__(self, *args, eval_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seed = eval_seed

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            self.eval_env.seed(self.eval_seed)
        return super()._on_step()


class FixedSeedEvalCallback(_FixedSeed, EvalCallback):
    """EvalCallback on the same items at every evaluation."""


def _eval_callback_class(algo_cls: type) -> type:
    """MaskablePPO evaluates with the env's masks (sb3-contrib's MaskableEvalCallback); others as SB3 does."""
    if not _is_maskable(algo_cls):
        return FixedSeedEvalCallback
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback

    return type("FixedSeedMaskableEvalCallback", (_FixedSeed, MaskableEvalCallback), {})


def _is_maskable(algo_cls: type) -> bool:
    try:
        from sb3_contrib import MaskablePPO
    except ImportError:
        return False
    return issubclass(algo_cls, MaskablePPO)


def _check_masks(algo_cls: type, venv: VecEnv) -> None:
    if _is_maskable(algo_cls) and not venv.has_attr("action_masks"):
        raise ValueError(f"{algo_cls.__name__} reads the env's action_masks(), which this env lacks; train PPO "
                         "instead, or an env version with bit budgets (EnvConfig.bit_budget)")


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


def _training_env(cfg: TrainPPOConfig, venv: VecEnv, checkpoint: Path | None) -> VecEnv:
    """``venv`` behind the reward normaliser when ``normalize_reward``; a resumed run continues its statistics."""
    if not cfg.normalize_reward:
        return venv
    stats = vecnormalize_path(checkpoint) if checkpoint is not None else None
    if stats is not None and stats.is_file():
        return VecNormalize.load(str(stats), venv)
    if stats is not None:
        print(f"no reward-normaliser statistics at {stats}: they start afresh")
    gamma = float(cfg.algo_kwargs.get("gamma", 0.99))  # the return whose std scales the rewards
    return VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=gamma)


def teacher_data(cfg: TrainPPOConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations, actions and action masks of ``cfg.warm_start``'s episodes on the training env."""
    env = make_env(cfg.env)
    try:
        teacher = make_policy(cfg.warm_start, env=env)
        if isinstance(teacher, PlanningPolicy):
            raise ValueError(f"warm_start={cfg.warm_start!r} plans per item and cannot act on observations; imitate a "
                             "policy that acts per block (static, fixed, rule, mlp, sb3)")
        masks: list[np.ndarray] = []

        def keep_mask(episode) -> None:  # after reset and every step: the mask the next action is chosen under
            if not episode.done:
                masks.append(np.asarray(env.unwrapped.action_masks(), dtype=bool))

        obs, actions = [], []
        for i in tqdm(range(cfg.warm_start_episodes), desc=f"teacher {teacher.name}", disable=not cfg.progress):
            episode = rollout(env, teacher, seed=cfg.seed + i, callback=keep_mask)
            obs += episode.observations
            actions += episode.actions
    finally:
        env.close()
    return np.asarray(obs, dtype=np.float32), np.asarray(actions, dtype=np.int64), np.asarray(masks, dtype=bool)


def _warm_start(cfg: TrainPPOConfig, model: Any, algo_cls: type) -> dict[str, float]:
    obs, actions, masks = teacher_data(cfg)
    fit = behaviour_clone(model, obs, actions, masks if _is_maskable(algo_cls) else None,
                          epochs=cfg.warm_start_epochs, seed=cfg.seed)
    print(f"warm start: imitated {cfg.warm_start} on {len(actions)} steps of {cfg.warm_start_episodes} episodes: "
          f"agreement {fit['agreement']:.3f}, loss {fit['loss']:.3f}")
    return {"warm_start_steps": len(actions), **{f"warm_start_{k}": v for k, v in fit.items()}}


def _eval_env(cfg: TrainPPOConfig, make: Any) -> VecEnv:
    env = make_vec_env(make, n_envs=1, seed=cfg.eval_seed)
    # EvalCallback syncs normaliser statistics into an eval env wrapped the same way; this one changes nothing.
    return VecNormalize(env, training=False, norm_obs=False, norm_reward=False) if cfg.normalize_reward else env


def run(cfg: TrainPPOConfig) -> dict[str, Path]:
    """Train (or continue training) and save the final model; returns the paths written."""
    if cfg.env.split != "train":
        raise ValueError(f"train_ppo trains on the train split only (got env.split={cfg.env.split!r}); set env.split=train")
    if cfg.total_timesteps < 1 or cfg.n_envs < 1:
        raise ValueError(f"total_timesteps and n_envs must be >= 1, got {cfg.total_timesteps} and {cfg.n_envs}")
    if cfg.reference_policy is not None:
        parse_spec(cfg.reference_policy)
    if cfg.warm_start is not None:
        parse_spec(cfg.warm_start)  # a malformed teacher fails before any model is loaded
        if cfg.warm_start_episodes < 1 or cfg.warm_start_epochs < 1:
            raise ValueError(f"warm_start needs warm_start_episodes and warm_start_epochs >= 1, got "
                             f"{cfg.warm_start_episodes} and {cfg.warm_start_epochs}")
    algo_cls = resolve_algorithm(cfg.algo)
    out_dir = Path(cfg.out_dir)
    ckpt_dir, tb_dir = out_dir / CHECKPOINT_DIR, out_dir / "tb"
    existing = checkpoints(ckpt_dir)
    resumed = cfg.resume and bool(existing)
    if resumed:
        _check_resumable(cfg, out_dir)
    elif existing:
        print(f"resume=false: removing {len(existing)} checkpoint(s) of an earlier run in {ckpt_dir}")
        for p in existing:
            p.unlink()
            vecnormalize_path(p).unlink(missing_ok=True)
    paths: dict[str, Path] = {"config": save_config(cfg, out_dir / "config.yaml"), "checkpoints": ckpt_dir,
                              "tensorboard": tb_dir, "learning_curve": out_dir / CURVE_NAME}

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    make = partial(make_env, cfg.env)
    venv = _training_env(cfg, make_vec_env(partial(make_training_env, cfg), n_envs=cfg.n_envs, seed=cfg.seed),
                         existing[-1] if resumed else None)
    _check_masks(algo_cls, venv)
    eval_env = None
    wb, patched = _init_run(cfg, out_dir, tb_dir)
    try:
        if resumed:
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
            if cfg.warm_start is not None:
                wb.summary.update(_warm_start(cfg, model, algo_cls))

        start_curve(paths["learning_curve"], keep_through=model.num_timesteps if resumed else 0)
        callbacks = [LearningCurveCallback(paths["learning_curve"], run=wb)]
        if cfg.checkpoint_every > 0:
            callbacks.append(AtomicCheckpointCallback(max(cfg.checkpoint_every // cfg.n_envs, 1), str(ckpt_dir),
                                                      name_prefix=cfg.algo.lower()))
        if cfg.eval_freq > 0:
            eval_env = _eval_env(cfg, make)
            callbacks.append(_eval_callback_class(algo_cls)(eval_env, eval_seed=cfg.eval_seed,
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
                path = save_checkpoint(model, ckpt)
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

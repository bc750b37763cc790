"""``evaluate`` with ``backend: ray``: (policy, item) episodes spread over Ray actors.

    python -m experiments.evaluate --set backend=ray --set ray_workers=8 --set items=1000
    RAY_ADDRESS=ray://head:10001 python -m experiments.evaluate --set backend=ray ...

Every episode is independent (``reset(options={"row": r})`` fixes item and shots), so evaluation
spreads over a cluster with nothing shared but the config. Each actor builds the eval env and the
policies once, from the same config, with ``evaluate``'s own functions, and produces each record
with ``evaluate._episode_record``: the records are those of the sequential backend (all but
``ms``). The driver (the process running ``evaluate``) keeps ``records.jsonl`` and the resume
logic: it appends each record as its task completes, so an actor that dies loses only the episodes
it had not finished; Ray restarts it (the model loads again) and retries its unfinished tasks, and
a task whose actor is gone for good goes to another actor.

Ray: an already initialised Ray is used as it is; otherwise ``RAY_ADDRESS``, where set, names the
cluster to join (``ray.init()`` reads it), and without it a local Ray starts on this machine's
cores. The cluster's nodes need kvgym and its data (``ray job submit --working-dir .`` ships the
code). A worker whose fingerprint differs from the driver's is refused unless
``allow_mixed_fingerprints``: records carry the fingerprint of the machine that computed them, and
this keeps one run's records comparable item for item.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch

from envs.fingerprint import fingerprint, fingerprint_id
from envs.kv_precision import KVPrecisionEnv
from experiments import evaluate

#: restarts of a dead actor (each reloads the model) and retries of the tasks it had not finished
MAX_RESTARTS = 3
#: tasks queued per actor, so an actor never waits on the driver between episodes
QUEUED_PER_ACTOR = 2
#: test hook: ``"K:PATH"`` makes the actor that runs its K-th episode exit abruptly, once (PATH is created)
CRASH_ENV_VAR = "KVGYM_TEST_RAY_CRASH"


class EpisodeWorker:
    """One Ray actor: the eval env and every policy of the config, built once, running episodes."""

    def __init__(self, cfg: evaluate.EvaluateConfig, driver_fingerprint: str, crash: str | None = None) -> None:
        torch.set_num_threads(cfg.threads or 1)  # one actor per core: more threads only contend
        self.env = KVPrecisionEnv(evaluate._eval_env_config(cfg))
        self.runners = evaluate._runners(cfg, evaluate._policy_names(cfg), self.env)
        mine = fingerprint_id(fingerprint(self.env.model.device, self.env.model.dtype))
        if mine != driver_fingerprint and not cfg.allow_mixed_fingerprints:
            raise RuntimeError(
                f"a Ray worker on {os.uname().nodename} has fingerprint {mine!r}, the driver {driver_fingerprint!r}: "
                "per-item quantized scores differ across machines. Run on machines of one kind (and the driver "
                "on one of them), or set allow_mixed_fingerprints=true (records then carry each worker's own).")
        self.fingerprint_id = mine
        self.crash = crash
        self.episodes = 0

    def run(self, name: str, row: int) -> dict:
        self.episodes += 1
        self._maybe_crash()
        return evaluate._episode_record(self.env, self.runners, name, row, self.fingerprint_id)

    def _maybe_crash(self) -> None:
        if not self.crash:
            return
        k, _, flag = self.crash.partition(":")
        if self.episodes == int(k) and not Path(flag).exists():
            Path(flag).touch()
            os._exit(1)  # as a killed process: no cleanup, no exception to Ray


def _init_ray(cfg: evaluate.EvaluateConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it and so should shut it down."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster RAY_ADDRESS names
    else:
        threads = cfg.threads or 1
        ray.init(num_cpus=cfg.ray_workers * threads if cfg.ray_workers else None, include_dashboard=False)
    return True


def _worker_count(cfg: evaluate.EvaluateConfig, episodes: int) -> int:
    if cfg.ray_workers is not None:
        if cfg.ray_workers < 1:
            raise ValueError(f"ray_workers must be >= 1, got {cfg.ray_workers}")
        return min(cfg.ray_workers, episodes)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus // (cfg.threads or 1), episodes))


def ray_episodes(cfg: evaluate.EvaluateConfig, todo: list[tuple[str, int]], driver_fingerprint: str) -> Iterator[dict]:
    """Records of the ``todo`` (policy, row) episodes, each yielded as soon as its task completes."""
    if not todo:
        return
    started = _init_ray(cfg)
    actor_cls = ray.remote(num_cpus=cfg.threads or 1, max_restarts=MAX_RESTARTS,
                           max_task_retries=MAX_RESTARTS)(EpisodeWorker)
    crash = os.environ.get(CRASH_ENV_VAR)
    actors = [actor_cls.remote(cfg, driver_fingerprint, crash) for _ in range(_worker_count(cfg, len(todo)))]
    pending: deque[tuple[str, int]] = deque(todo)
    running: dict[Any, tuple[Any, tuple[str, int]]] = {}  # future -> (actor, episode)

    def submit(actor) -> None:
        if pending:
            episode = pending.popleft()
            running[actor.run.remote(*episode)] = (actor, episode)

    try:
        for actor in actors:
            for _ in range(QUEUED_PER_ACTOR):
                submit(actor)
        while running:
            [done], _ = ray.wait(list(running), num_returns=1)
            actor, episode = running.pop(done)
            try:
                record = ray.get(done)
            except ray.exceptions.RayActorError:  # gone for good (restarts spent): its episodes go elsewhere
                pending.appendleft(episode)
                if actor in actors:
                    actors.remove(actor)
                if not actors:
                    raise
                for other in actors:
                    if sum(a is other for a, _ in running.values()) < QUEUED_PER_ACTOR:
                        submit(other)
                continue
            yield record
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()

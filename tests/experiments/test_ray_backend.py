"""experiments.evaluate with backend=ray on a local 2-CPU Ray and the tiny model."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from envs.kv_precision import EnvConfig  # noqa: E402
from experiments import evaluate, ray_backend  # noqa: E402
from experiments.evaluate import EvaluateConfig  # noqa: E402

POLICIES = ["fp16", "fixed:2", "fixed:4", "rule", "quanto:4"]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(out_dir, **kw) -> EvaluateConfig:
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="eval")
    base = dict(env=env, policies=POLICIES, items=2, out_dir=str(out_dir), progress=False)
    return EvaluateConfig(**{**base, **kw})


def _by_episode(out_dir) -> dict[tuple[str, int], dict]:
    """Records by (policy, row), without ``ms`` (wall time is the one field allowed to differ)."""
    records = evaluate._load_done(out_dir / "records.jsonl")[0]
    keyed = {(r["policy"], r["row"]): {k: v for k, v in r.items() if k != "ms"} for r in records}
    assert len(keyed) == len(records), "an episode was recorded twice"
    return keyed


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("sequential")
    evaluate.run(_cfg(out))
    return _by_episode(out)


def test_ray_records_equal_the_sequential_ones_and_resume_runs_nothing(tmp_path, sequential, monkeypatch):
    result = evaluate.run(_cfg(tmp_path, backend="ray", ray_workers=2))
    assert _by_episode(tmp_path) == sequential
    assert set(result["policies"]) == set(POLICIES)

    asked = []
    real = ray_backend.ray_episodes
    monkeypatch.setattr(ray_backend, "ray_episodes", lambda cfg, todo, fp: (asked.append(list(todo)), real(cfg, todo, fp))[1])
    evaluate.run(_cfg(tmp_path, backend="ray", ray_workers=2))
    assert asked in ([], [[]])  # nothing left to run
    assert _by_episode(tmp_path) == sequential


def test_an_actor_killed_mid_run_loses_no_finished_episode(tmp_path, sequential, monkeypatch):
    flag = tmp_path / "crashed"
    monkeypatch.setenv(ray_backend.CRASH_ENV_VAR, f"3:{flag}")  # the actor running its 3rd episode dies once
    evaluate.run(_cfg(tmp_path / "eval", backend="ray", ray_workers=2))
    assert flag.exists()  # an actor did die mid-run
    assert _by_episode(tmp_path / "eval") == sequential  # ...and every episode is there, once, equal


def test_unknown_backend_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        evaluate.run(_cfg(tmp_path, backend="dask"))


def test_a_worker_of_another_fingerprint_is_refused(tmp_path, local_ray):
    cfg = _cfg(tmp_path, policies=["fp16"], references=["fp16"], backend="ray", ray_workers=1)
    with pytest.raises(ray.exceptions.RayActorError, match="fingerprint"):
        list(ray_backend.ray_episodes(cfg, [("fp16", 0)], driver_fingerprint="another-machine"))

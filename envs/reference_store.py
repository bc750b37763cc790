"""Full-precision references on disk: each episode's reference pass is computed once, then reused.

The reference of an episode (per-position target log-probs of the prompt, the endings' scores and
the two predictions) costs as much as the episode itself; with a fixed episode set (envs.episodes)
every later episode, in this process or another, reads it instead. An entry is one safetensors file
under ``$KVGYM_CACHE/references/`` (default ``~/.cache/kvgym/references/``) named by the digest of its
key, written atomically (``envs.io.atomic_write``: concurrent writers of the same entry leave one
whole file). Its header holds the full key and a checksum of the tensors, so a truncated or garbled
file, or a file whose key differs (another model, dtype, device or fingerprint that happens to sit
under the name), is never used: ``load`` returns None and the caller recomputes and rewrites it.

The same store holds other passes of an episode's tokens that are worth computing once, told apart
by the key's ``variant``: ``""`` is the full-precision reference (its key, and so every entry written
before variants existed, is unchanged), and e.g. the env's baseline passes (every block at one fixed
setting, ``KVPrecisionEnv.baseline_scores``) name the setting and every env option that changes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from envs.io import atomic_write
from envs.model import kvgym_cache_root

__all__ = ["ReferenceKey", "ReferenceStore", "default_reference_root", "model_digest", "tokens_digest"]

FORMAT = "kvgym-reference-v1"


def default_reference_root() -> Path:
    """``$KVGYM_CACHE/references`` or ``~/.cache/kvgym/references``."""
    return kvgym_cache_root() / "references"


@dataclass(frozen=True)
class ReferenceKey:
    """Everything a stored reference depends on; entries whose key differs in any field are foreign."""

    model: str  # spec, weight quantization and digest of the weights
    dtype: str
    device: str  # device type ("cpu", "cuda"): results differ between them, not between two GPUs' indices
    tokens: str  # tokens_digest of the prompt and endings
    fingerprint: str  # envs.fingerprint id of the process computing it
    # which pass of these tokens: "" = the full-precision reference; else e.g. a baseline pass's
    # "baseline|setting=k4v2|cache=mixed|..." (everything the pass depends on beyond the fields above)
    variant: str = ""
    # how the endings were scored against the cache (envs.scoring.CACHED_SCORING: one packed row, or
    # "rows"): the layout moves scores by float noise, so entries of another layout are not reused
    scoring: str = ""

    def as_dict(self) -> dict[str, str]:
        """The key's fields; an empty ``variant`` or ``scoring`` is left out, so keys without them (and
        their stored entries) are the same as before those fields existed."""
        fields = asdict(self)
        for name in ("variant", "scoring"):
            if not fields[name]:
                del fields[name]
        return fields

    def as_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:32]


def tokens_digest(prompt_ids: list[int], endings: list[list[int]]) -> str:
    """SHA-256 of the prompt ids and the ending ids (with their boundaries)."""
    text = json.dumps([list(map(int, prompt_ids)), [list(map(int, e)) for e in endings]], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


_MODEL_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_digest(model: torch.nn.Module) -> str:
    """BLAKE2b of every parameter and buffer (names, dtypes, shapes, bytes), once per model object:
    two models under one spec (``lm=``, another checkpoint in the same directory) never share entries."""
    digest = _MODEL_DIGESTS.get(model)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            h.update(_bytes(tensor))
        digest = _MODEL_DIGESTS[model] = h.hexdigest()
    return digest


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_bytes(t))
    return h.hexdigest()


class ReferenceStore:
    """A folder of stored references (see the module docstring); ``root=None`` is the default folder."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_reference_root()

    def path(self, key: ReferenceKey) -> Path:
        return self.root / f"{key.digest()}.safetensors"

    def load(self, key: ReferenceKey) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (on the CPU), or None when it is missing, unreadable, foreign or corrupt."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # no view of the file
        except Exception:  # truncated or garbled: safetensors raises several kinds
            return None
        if meta.get("format") != FORMAT or meta.get("key") != key.as_json():
            return None
        if meta.get("checksum") != _checksum(tensors):
            return None
        return tensors

    def save(self, key: ReferenceKey, tensors: dict[str, torch.Tensor]) -> Path:
        """Write (or overwrite) the entry of ``key`` atomically; returns its path."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {"format": FORMAT, "key": key.as_json(), "checksum": _checksum(tensors)}
        return atomic_write(self.path(key), lambda tmp: save_file(tensors, tmp, metadata=meta))

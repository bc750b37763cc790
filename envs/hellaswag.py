"""HellaSwag items: loading (local JSONL or the hub), a held-out split, k-shot prompts.

The prompt format and text cleaning follow lm-evaluation-harness so that accuracies here are
comparable with published numbers for the same model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUB_DATASET = "Rowan/hellaswag"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"
LOCAL_FIELDS = ("row", "activity_label", "ctx", "endings", "label")
HUB_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")

__all__ = [
    "HellaSwagItem",
    "Splits",
    "load_hellaswag",
    "default_hellaswag_path",
    "preprocess",
    "split_items",
    "build_prompt",
    "sample_shots",
]


@dataclass(frozen=True)
class HellaSwagItem:
    row: int
    activity_label: str
    ctx: str
    endings: tuple[str, ...]
    label: int

    @property
    def query(self) -> str:
        return f"{self.activity_label}: {self.ctx}"

    @property
    def gold_ending(self) -> str:
        return self.endings[self.label]


@dataclass(frozen=True)
class Splits:
    pool: list[HellaSwagItem]  # few-shot examples and agent training
    eval: list[HellaSwagItem]  # held out


def default_hellaswag_path() -> Path:
    """``$KVGYM_HELLASWAG`` if set, else ``../shared/data/hellaswag_val.jsonl`` beside the repo."""
    override = os.environ.get("KVGYM_HELLASWAG")
    return Path(override) if override else DEFAULT_PATH


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (tasks/hellaswag/utils.py), kept byte-for-byte equivalent.

    The brackets are WikiHow artifacts; note lm-eval replaces double spaces in a single pass.
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _from_hub_row(doc: dict, row: int) -> HellaSwagItem:
    """Clean one hub-schema record as lm-eval's ``process_docs`` does."""
    if str(doc["label"]).strip() == "":
        raise ValueError("This HellaSwag split has no labels (the hub test split is unlabeled); use 'validation'.")
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    # lm-eval cleans "label: ctx" as one string; cleaning the parts separately can differ (a
    # removed leading "[header]" leaves a space after the colon), so clean the whole and split.
    label = preprocess(doc["activity_label"])
    query = preprocess(doc["activity_label"] + ": " + ctx)
    ctx = query[len(label) + 2 :] if query.startswith(label + ": ") else preprocess(ctx)
    return HellaSwagItem(
        row=int(doc.get("ind", doc.get("index", row))),
        activity_label=label,
        ctx=ctx,
        endings=tuple(preprocess(e) for e in doc["endings"]),
        label=int(doc["label"]),
    )


def _from_local_row(doc: dict) -> HellaSwagItem:
    endings = doc["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError("'endings' must be a list of at least two strings")
    label = int(doc["label"])
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} out of range for {len(endings)} endings")
    return HellaSwagItem(
        row=int(doc["row"]),
        activity_label=str(doc["activity_label"]),
        ctx=str(doc["ctx"]),
        endings=tuple(endings),
        label=label,
    )


def _read_jsonl(path: Path, schema: str) -> list[HellaSwagItem]:
    items: list[HellaSwagItem] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise ValueError("line is not a JSON object")
                kind = schema if schema != "auto" else ("hub" if "ctx_a" in doc else "local")
                needed = HUB_FIELDS if kind == "hub" else LOCAL_FIELDS
                missing = [f for f in needed if f not in doc]
                if missing:
                    raise ValueError(f"missing field(s) {missing} for the {kind} schema")
                items.append(_from_hub_row(doc, len(items)) if kind == "hub" else _from_local_row(doc))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: malformed HellaSwag record: {err}") from err
    return items


def _load_hub(dataset_id: str, split: str) -> list[HellaSwagItem]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # network/hub errors come in many types
        raise OSError(
            f"Could not load {dataset_id!r} from the hub ({err.__class__.__name__}: {err}). Offline, use the local "
            f"file {DEFAULT_PATH} (the default) or pass a JSONL path."
        ) from err
    return [_from_hub_row(doc, i) for i, doc in enumerate(data)]


def load_hellaswag(
    source: str | os.PathLike | None = None, split: str = "validation", schema: str = "auto"
) -> list[HellaSwagItem]:
    """Load items from a JSONL file (``schema`` 'local', 'hub' or 'auto' per line) or ``Rowan/hellaswag``.

    ``split`` only matters for the hub; a local file is taken whole.
    """
    if schema not in ("auto", "local", "hub"):
        raise ValueError(f"schema must be 'auto', 'local' or 'hub', not {schema!r}")
    if source is None:
        source = default_hellaswag_path()
    if str(source) == HUB_DATASET:
        return _load_hub(HUB_DATASET, split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"HellaSwag file {path} not found. The shared data is expected at {DEFAULT_PATH} "
            f"(override with KVGYM_HELLASWAG=/path/to/hellaswag_val.jsonl) or pass source={HUB_DATASET!r} online."
        )
    items = _read_jsonl(path, schema)
    if not items:
        raise ValueError(f"{path} holds no HellaSwag items")
    return items


def split_items(items: Sequence[HellaSwagItem], eval_size: int, seed: int = 0) -> Splits:
    """Disjoint pool/eval split, fixed by ``seed`` and independent of the order items came in."""
    if not 0 <= eval_size <= len(items):
        raise ValueError(f"eval_size must be between 0 and {len(items)} (the number of items), got {eval_size}")
    ordered = sorted(items, key=lambda it: it.row)
    rows = [it.row for it in ordered]
    if len(set(rows)) != len(rows):
        raise ValueError("items have duplicate row ids; a disjoint split needs unique rows")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(len(ordered))
    shuffled = [ordered[i] for i in perm]
    return Splits(pool=shuffled[eval_size:], eval=shuffled[:eval_size])


def build_prompt(item: HellaSwagItem, shots: Sequence[HellaSwagItem]) -> str:
    """lm-eval's k-shot layout: solved examples separated by blank lines, then the query."""
    return "".join(f"{s.query} {s.endings[s.label]}\n\n" for s in shots) + item.query


def item_rng(seed: int, row: int) -> np.random.Generator:
    """Per-item generator: an item's fixed shots depend only on (seed, row), never on which other
    items are evaluated, so the environment and the fp16 evaluator build the same prompt."""
    return np.random.default_rng([seed, row])


def sample_shots(
    pool: Sequence[HellaSwagItem], k: int, rng: np.random.Generator, exclude_row: int
) -> list[HellaSwagItem]:
    """``k`` distinct solved examples from ``pool``, never the item being asked."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    candidates = [it for it in pool if it.row != exclude_row]
    if k > len(candidates):
        raise ValueError(f"asked for {k} shots but the pool has only {len(candidates)} usable items")
    if k == 0:
        return []
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]

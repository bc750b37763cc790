"""Pass-key retrieval: a five-digit key hidden at a chosen depth in natural text, then the question.

Why this task: on HellaSwag few-shot, which block is kept precisely barely matters (the damage of a
low-precision block is mostly noise); here one block holds the answer, so precision must follow
content (MiKV's line retrieval, KIVI's passkey runs, needle-in-a-haystack). Everything is generated
offline and deterministically from ``seed``: the haystack is sentences of the shared HellaSwag
contexts (sentences with digits left out, so no other number competes with the key), the keys,
depths and candidate order come from a per-row generator ``default_rng([seed, row])``.

An item's prompt: an instruction, the haystack with the needle ("The pass key is 12345. Remember
it. 12345 is the pass key.") after ``round(depth * n)`` of its ``n`` filler sentences, a blank line
and the question ("Question: What is the pass key?\nAnswer: The pass key is"). The filler is the longest that keeps the prompt
within ``length`` tokens. With ``keys > 1`` every needle names its key ("The pass key of Alice is
...") and the question asks for one name's key; the others sit at depths drawn from [0, 1] and are
the first distractors. Candidates are the true key and distinct five-digit distractors, scored like
HellaSwag's endings; ``answer_text`` makes greedy exact match available.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.hellaswag import HellaSwagItem
from envs.tasks.base import Task, register_task

__all__ = ["PasskeyItem", "PasskeyPrompt", "PasskeyTask", "NAMES"]

INSTRUCTION = (
    "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about it.\n\n"
)
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James",
         "Karen", "Louis", "Maria", "Nora", "Oscar", "Peter", "Rosa", "Simon", "Tina", "Victor")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_KEY_LOW, _KEY_HIGH = 10000, 100000  # five digits
EVIDENCE = ("all", "asked")  # what PasskeyTask.evidence names
DISTRACTORS = ("random", "near")  # how distractor keys beyond the other named keys are drawn


@dataclass(frozen=True)
class PasskeyItem:
    row: int
    endings: tuple[str, ...]  # candidate keys (the true key and distractors), shuffled
    label: int  # index of the true key in ``endings``
    key: str  # the key asked for
    depth: float  # where its needle sits: the fraction of filler sentences before it
    name: str | None  # whose key is asked (keys > 1), None with one key
    needles: tuple[tuple[str | None, str, float], ...]  # every (name, key, depth) hidden in the haystack


@dataclass(frozen=True)
class PasskeyPrompt:
    """An item's prompt and where its needles are (what the tests check)."""

    text: str
    sentences: tuple[str, ...]  # the haystack: filler and needle sentences in order
    needle_index: int  # position of the asked key's needle in ``sentences``
    filler: int  # filler sentences in the haystack


def _needle(name: str | None, key: str) -> str:
    if name is None:
        return f"The pass key is {key}. Remember it. {key} is the pass key."
    return f"The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."


def _question(name: str | None) -> str:
    # the Question/Answer layout: on the embedded 135M model it makes greedy decoding answer with the
    # digits far more often than a bare "What is the pass key? The pass key is" (which it continues " a ...")
    if name is None:
        return "Question: What is the pass key?\nAnswer: The pass key is"
    return f"Question: What is the pass key of {name}?\nAnswer: The pass key of {name} is"


def _asked(name: str | None) -> str:
    """The question alone, asked after the instruction with ``question_first`` (before the haystack)."""
    return "What is the pass key?" if name is None else f"What is the pass key of {name}?"


def haystack_sentences(source: Sequence[HellaSwagItem]) -> list[str]:
    """Whole sentences of the HellaSwag contexts, without digits, deduplicated, in row order."""
    seen: dict[str, None] = {}
    for item in sorted(source, key=lambda it: it.row):
        for sentence in _SENTENCE_END.split(item.ctx.strip()):
            sentence = sentence.strip()
            if (len(sentence.split()) >= 4 and sentence[-1] in ".!?" and sentence[0].isupper()
                    and ".." not in sentence and not any(c.isdigit() for c in sentence)):
                seen.setdefault(sentence, None)
    return list(seen)


def _depth_range(depth: Any) -> tuple[float, float]:
    """A fixed depth ``d`` -> (d, d); a range [lo, hi] -> (lo, hi); both inside [0, 1]."""
    if isinstance(depth, (list, tuple)) and len(depth) == 2:
        lo, hi = depth
    else:
        lo = hi = depth
    for value in (lo, hi):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"passkey depth must be a number in [0, 1] or a range [lo, hi] inside it, got {depth!r}")
    if lo > hi:
        raise ValueError(f"passkey depth range [lo, hi] needs lo <= hi, got {depth!r}")
    return float(lo), float(hi)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"passkey {name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_task("passkey")
class PasskeyTask(Task):
    """Options: ``length`` (prompt tokens at most, default 512; up to the model's context), ``depth``
    (a fraction in [0, 1], or [lo, hi] drawn per item; default [0, 1]), ``keys`` (named keys hidden,
    one asked; default 2), ``candidates`` (answers scored, default 4), ``items`` (rows 0..items-1,
    default 1500), ``seed`` (default 0), ``question_first`` (also ask the question right after the
    instruction; default false), ``distractors`` ("random" five-digit numbers, or "near": the key with
    one digit changed; default "random"), ``evidence`` (what :meth:`evidence` names: "all" needles,
    the default, or the "asked" one only).

    Why the defaults (README, "The passkey task's defaults"; 30 held-out items on the embedded model):
    at 512 tokens with two named keys fp16 picks the right key ~90% of the time and fixed 2-bit far
    less; with one key every setting down to 2 bits still ranks the key first (the candidates cannot
    tell them apart, even "near" ones), with three keys fp16 falls to ~77% (it confuses the names), and
    asking the question first *lowers* it (46% at three keys). 512 tokens is 8 blocks of 64: half the
    cost of 1024 on CPUs."""

    exact_match = True
    uses_shots = False  # the haystack is the context; the env's ``shots`` does not apply

    def __init__(self, length: int = 512, depth: float | Sequence[float] = (0.0, 1.0), keys: int = 2,
                 candidates: int = 4, items: int = 1500, seed: int = 0, question_first: bool = False,
                 distractors: str = "random", evidence: str = "all"):
        self.length = _positive_int("length", length)
        self.depth = _depth_range(depth)
        self.keys = _positive_int("keys", keys)
        if self.keys > len(NAMES):
            raise ValueError(f"passkey keys must be at most {len(NAMES)} (the names available), got {keys}")
        self.candidates = _positive_int("candidates", candidates, minimum=2)
        self.n_items = _positive_int("items", items)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"passkey seed must be an integer, got {seed!r}")
        self.seed = seed
        if not isinstance(question_first, bool):
            raise ValueError(f"passkey question_first must be true or false, got {question_first!r}")
        self.question_first = question_first
        if distractors not in DISTRACTORS:
            raise ValueError(f"passkey distractors must be one of {DISTRACTORS}, got {distractors!r}")
        self.distractors = distractors
        if evidence not in EVIDENCE:
            raise ValueError(f"passkey evidence must be one of {EVIDENCE}, got {evidence!r}")
        self.evidence_kind = evidence
        self._tokenizer = None
        self._sentences: list[str] = []
        self._sentence_tokens: dict[int, int] = {}
        self._prompts: dict[int, PasskeyPrompt] = {}

    # --- items ----------------------------------------------------------------------------------
    def load(self, source: Sequence[HellaSwagItem], tokenizer, max_positions: int) -> list[PasskeyItem]:
        answer_tokens = len(tokenizer.encode(f" {_KEY_HIGH - 1}"))
        if self.length + answer_tokens > max_positions:
            raise ValueError(
                f"passkey length {self.length} + {answer_tokens} answer tokens exceed the model's context of "
                f"{max_positions} positions; use length <= {max_positions - answer_tokens}"
            )
        self._tokenizer = tokenizer
        self._sentences = haystack_sentences(source)
        if not self._sentences:
            raise ValueError("the HellaSwag data gives no whole sentences for the passkey haystack")
        self._prompts = {}
        items = [self._item(row) for row in range(self.n_items)]
        self.prompt(items[0])  # fail here, not in reset, on a length too short for the needles
        return items

    def _item(self, row: int) -> PasskeyItem:
        rng = np.random.default_rng([self.seed, row])
        keys: list[str] = []
        while len(keys) < self.keys:
            key = str(int(rng.integers(_KEY_LOW, _KEY_HIGH)))
            if key not in keys:
                keys.append(key)
        names: list[str | None] = (
            [None] if self.keys == 1 else [NAMES[i] for i in rng.choice(len(NAMES), self.keys, replace=False)]
        )
        asked = int(rng.integers(self.keys))
        lo, hi = self.depth
        depths = [float(rng.uniform(0.0, 1.0)) for _ in range(self.keys)]
        depths[asked] = lo if lo == hi else float(rng.uniform(lo, hi))
        # distractors: the other named keys first, then fresh five-digit numbers, never the key
        candidates = [keys[asked]] + [k for i, k in enumerate(keys) if i != asked][: self.candidates - 1]
        while len(candidates) < self.candidates:
            key = self._distractor(keys[asked], rng)
            if key not in candidates and key not in keys:
                candidates.append(key)
        order = rng.permutation(len(candidates))
        endings = tuple(candidates[i] for i in order)
        return PasskeyItem(
            row=row, endings=endings, label=int(np.flatnonzero(order == 0)[0]), key=keys[asked],
            depth=depths[asked], name=names[asked],
            needles=tuple(zip(names, keys, depths, strict=True)),
        )

    def _distractor(self, key: str, rng: np.random.Generator) -> str:
        """A fresh five-digit number ("random"), or the key with one digit changed ("near": only a model that
        read every digit of the needle tells them apart; the first digit alone no longer decides)."""
        if self.distractors == "random":
            return str(int(rng.integers(_KEY_LOW, _KEY_HIGH)))
        position = int(rng.integers(len(key)))
        digits = [d for d in "0123456789" if d != key[position] and not (position == 0 and d == "0")]
        return key[:position] + digits[int(rng.integers(len(digits)))] + key[position + 1:]

    # --- prompts --------------------------------------------------------------------------------
    def context(self, item: PasskeyItem, shots: Sequence[Any] = ()) -> str:
        return self.prompt(item).text

    def answer_text(self, item: PasskeyItem) -> str:
        return item.key

    def evidence(self, item: PasskeyItem) -> list[str]:
        """Every needle sentence (``evidence: all``, the default), or the asked key's only ("asked").

        Why all by default: the question comes last, so a controller streaming the prompt cannot know
        which needle will be asked when it commits their blocks, and a teacher that keeps only the
        asked one labels look-alike blocks differently, which no student can imitate. Measured on 10
        pool items (results/sensitivity_passkey/needle_blocks.txt): lowering the *other* needle's block
        to 2 bits costs the gold key -1.23 nats on average (the asked one's -1.51, other blocks -0.42),
        so keeping the distractor precise helps retrieval rather than confusing it. "asked" is the
        privileged upper bound."""
        if self.evidence_kind == "asked":
            return [_needle(item.name, item.key)]
        return [_needle(name, key) for name, key, _ in item.needles]

    def prompt(self, item: PasskeyItem) -> PasskeyPrompt:
        """The item's prompt: the most filler sentences that keep it within ``length`` tokens."""
        if self._tokenizer is None:
            raise RuntimeError("load() the passkey task before building prompts")
        cached = self._prompts.get(item.row)
        if cached is not None:
            return cached
        order = np.random.default_rng([self.seed, item.row, 1]).permutation(len(self._sentences))
        fixed = self._count(self._layout(item, order, 0).text)
        if fixed > self.length:
            raise ValueError(
                f"passkey length {self.length} is too short: the instruction, needles and question alone take "
                f"{fixed} tokens"
            )
        # estimate the filler from per-sentence token counts, then correct with exact counts
        n, budget = 0, self.length - fixed
        while n < len(order) and budget - self._sentence_len(int(order[n])) >= 0:
            budget -= self._sentence_len(int(order[n]))
            n += 1
        layout = self._layout(item, order, n)
        while n > 0 and self._count(layout.text) > self.length:
            n -= 1
            layout = self._layout(item, order, n)
        while n < len(order):
            bigger = self._layout(item, order, n + 1)
            if self._count(bigger.text) > self.length:
                break
            n, layout = n + 1, bigger
        if n == len(order):
            raise ValueError(f"the haystack has only {n} sentences, too few for {self.length} tokens")
        self._prompts[item.row] = layout
        return layout

    def _layout(self, item: PasskeyItem, order: np.ndarray, n: int) -> PasskeyPrompt:
        filler = [self._sentences[int(i)] for i in order[:n]]
        slots: list[list[str]] = [[] for _ in range(n + 1)]
        for name, key, depth in item.needles:
            slots[int(round(depth * n))].append(_needle(name, key))
        sentences: list[str] = []
        needle_index = -1
        asked = _needle(item.name, item.key)
        for i in range(n + 1):
            for needle in slots[i]:
                if needle == asked:
                    needle_index = len(sentences)
                sentences.append(needle)
            if i < n:
                sentences.append(filler[i])
        head = INSTRUCTION + (f"{_asked(item.name)}\n\n" if self.question_first else "")
        text = head + " ".join(sentences) + "\n\n" + _question(item.name)
        return PasskeyPrompt(text, tuple(sentences), needle_index, n)

    def _count(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    def _sentence_len(self, index: int) -> int:
        if index not in self._sentence_tokens:
            self._sentence_tokens[index] = len(self._tokenizer.encode(" " + self._sentences[index]))
        return self._sentence_tokens[index]

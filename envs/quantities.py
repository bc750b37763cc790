"""What a step offers reward terms: the step's scalars, and named quantities computed on demand.

CompilerGym's model: a reward term names the quantities it ``needs`` and reads exactly those, by
name, from a :class:`StepView`. Each quantity is produced by one provider function registered under
its name in :data:`QUANTITIES`; a provider reads the env's raw :class:`StepState` or other
quantities it declares. The env hands every step a fresh view, so a quantity is computed at most
once per step and only if some term (or a quantity a term reads) asks for it: a term that needs
something new is one provider plus one class, with no edit to the env. Example::

    @register_quantity("top1_agreement", needs={"next_block"})
    def top1_agreement(step: StepView) -> float:
        block = step["next_block"]
        mask = block.target_mask
        return float((block.logits[mask].argmax(-1) == block.targets[mask]).float().mean())

Declarations are enforced: reading an undeclared quantity is an error, and so is needing an unknown
one (at env construction), because the env decides from them what the model must compute (attention
maps are only requested when something needs them).

The step's scalars (:class:`StepRecord`) come free with every view: the env counts them anyway.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from envs.scoring import choose
from quant.registry import Registry

#: Quantities the model's forward produces only when asked (the names features use in ``needs``).
FORWARD_OUTPUTS = frozenset({"attentions", "saliency"})


@dataclass
class StepRecord:
    """The scalars of one step: what was committed and what the cache holds now."""

    bits: int | float  # the block just committed, bits per K/V element (an int for one width; K4V2: 3)
    max_bits: int  # the unit of bit-valued terms: 16 (fp16), whatever bits the env's menu offers
    block_tokens: int  # tokens in the committed block
    block_nbytes: int  # bytes the committed block holds (all layers, keys + values)
    block_fp16_nbytes: int  # the same block in fp16
    cache_nbytes: int  # bytes the whole committed cache holds after the commit
    cache_fp16_nbytes: int
    avg_bits: float  # token-weighted average committed bits after the commit
    step_seconds: float  # wall time of the step (commit + forward + features)
    terminal: bool


@dataclass
class StepState:
    """The env's raw material after a step (or at reset); each field is the quantity of its name."""

    model: Any  # the causal LM
    item: Any  # the episode's task item (envs.tasks: row, endings, label)
    cache: Any  # the MixedPrecisionKVCache; next_block's keys/values are still pending in it
    reference: Any  # the item's full-precision pass: target_logprobs [P-1], ending_scores, pred, pred_norm
    next_block: Any  # BlockContext of the block just run (block 0 at reset); None at the terminal step
    next_span: tuple[int, int] | None  # [start, end) prompt positions of next_block
    ending_scores: Any  # terminal only: [n_endings] summed log-probs under the policy's cache
    # ``setting -> [n_endings]`` ending scores of the episode's prompt with every block committed at
    # that setting (the env's baseline pass, computed once per prompt and setting); None: not offered
    baseline_scores: Callable[[Any], Any] | None = None
    # the env's task (envs.tasks): how candidates are chosen (acc, acc_norm); None: HellaSwag's rule
    task: Any = None


@dataclass
class Quantity:
    """A registered provider: ``fn(view)`` computes the value from the ``needs`` it declares."""

    fn: Callable[[StepView], Any]
    needs: frozenset[str]
    name: str = ""


QUANTITIES: Registry[Quantity] = Registry("step quantity")


def register_quantity(name: str, *, needs: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Function decorator: ``fn(view)`` becomes the provider of quantity ``name``."""

    def decorator(fn: Callable[[StepView], Any]) -> Callable[[StepView], Any]:
        QUANTITIES.register(name)(Quantity(fn, frozenset(needs)))
        return fn

    return decorator


def required(names: Iterable[str], reader: str) -> frozenset[str]:
    """``names`` and every quantity their providers read, transitively (what one step may compute)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in QUANTITIES:
            raise ValueError(
                f"{reader} needs unknown quantity {name!r}; known: {', '.join(QUANTITIES.names())}"
            )
        seen.add(name)
        todo.extend(QUANTITIES.get(name).needs)
    return frozenset(seen)


class StepView:
    """The quantities of one step, each computed on first read and kept for the rest of the step.

    ``record`` is None at reset (nothing committed yet). ``values`` pre-fills quantities (tests build
    views by hand this way). :meth:`restricted` views share the values but refuse undeclared names.
    """

    def __init__(
        self,
        record: StepRecord | None,
        state: StepState | None = None,
        values: Mapping[str, Any] | None = None,
    ):
        self.record = record
        self.state = state
        self._values: dict[str, Any] = dict(values or {})
        self._reader = ""
        self._allowed: frozenset[str] | None = None

    def __getitem__(self, name: str) -> Any:
        if self._allowed is not None and name not in self._allowed:
            raise KeyError(
                f"{self._reader} reads {name!r} without declaring it in needs {sorted(self._allowed)}"
            )
        if name not in self._values:
            quantity = QUANTITIES.get(name)
            self._values[name] = quantity.fn(self.restricted(f"quantity {name!r}", quantity.needs))
        return self._values[name]

    def restricted(self, reader: str, needs: Iterable[str]) -> StepView:
        """The same step seen by ``reader``, which may read only ``needs``."""
        view = copy.copy(self)  # shallow: the computed values stay shared
        view._reader, view._allowed = reader, frozenset(needs)
        return view


# --- built-in quantities --------------------------------------------------------------------------
for _field in dataclasses.fields(StepState):
    register_quantity(_field.name)(lambda step, _name=_field.name: getattr(step.state, _name))


@register_quantity("attentions", needs={"next_block"})
def _attentions(step: StepView):
    """Per layer [1, heads, T, S] attention maps of next_block (requested from the model only when needed)."""
    return step["next_block"].attentions


@register_quantity("saliency", needs={"next_block"})
def _saliency(step: StepView):
    """[T] |d max log-prob / d embedding| of next_block (a backward pass, only when needed)."""
    return step["next_block"].saliency


@register_quantity("token_logprob_deltas", needs={"next_block", "next_span", "reference"})
def _token_logprob_deltas(step: StepView):
    """[T'] per token of next_block with a known next token: its log-prob under the partly quantized
    cache minus under the item's full-precision reference; entry ``i`` is the prediction made at prompt
    position ``next_span[0] + i`` (empty at the terminal step: no tokens left)."""
    block = step["next_block"]
    if block is None:
        return torch.zeros(0)
    start = step["next_span"][0]
    ref = step["reference"].target_logprobs[start : start + int(block.target_mask.sum())]
    return block.target_log_probs - ref


@register_quantity("logprob_delta", needs={"token_logprob_deltas"})
def _logprob_delta(step: StepView) -> float:
    """Summed log-prob of next_block's actual tokens under the partly quantized cache minus the same
    under the item's full-precision reference (0 at the terminal step: no tokens left).

    Measuring against the item's own reference removes item difficulty from the signal and leaves
    the damage quantization did."""
    return float(step["token_logprob_deltas"].sum())


@register_quantity("ending_logprob_delta", needs={"ending_scores", "reference", "item"})
def _ending_logprob_delta(step: StepView) -> float:
    """Terminal: the gold ending's log-likelihood under the policy's cache minus under full precision."""
    gold = step["item"].label
    return float(step["ending_scores"][gold] - step["reference"].ending_scores[gold])


def baseline_pass(step: StepView) -> Callable[[Any], Any]:
    """The step's ``baseline_scores`` (setting -> [n_endings] scores), or a clear error where it offers none."""
    scores = step["baseline_scores"]
    if scores is None:
        raise RuntimeError("this step offers no baseline pass (StepState.baseline_scores is None)")
    return scores


@register_quantity("baseline_ending_logprob_delta", needs={"baseline_scores", "reference", "item"})
def _baseline_ending_logprob_delta(step: StepView) -> Callable[[Any], float]:
    """A function of a setting (an int, a pair or a name such as ``"k4v2"``): the gold ending's
    log-likelihood when every block of the episode's prompt is committed at that setting, minus under
    full precision. A function because a quantity has no parameters and each term names its own
    baseline; the env computes each baseline pass once per prompt (and stores it), not per call."""
    scores = baseline_pass(step)
    reference, gold = step["reference"], step["item"].label

    def delta(setting: Any) -> float:
        return float(scores(setting)[gold] - reference.ending_scores[gold])

    return delta


@register_quantity("choice", needs={"ending_scores", "item", "task"})
def _choice(step: StepView) -> tuple[int, int]:
    """Terminal: ``(pred, pred_norm)``, the ending chosen by log-likelihood and by it normalised as the
    task says (per character for HellaSwag, lm-eval's acc_norm)."""
    task, scores = step["task"], step["ending_scores"].tolist()
    return choose(scores, step["item"].endings) if task is None else task.choose(step["item"], scores)


@register_quantity("correct_norm", needs={"choice", "item"})
def _correct_norm(step: StepView) -> bool:
    """Terminal: the length-normalised choice is the gold ending."""
    return step["choice"][1] == step["item"].label


@register_quantity("reference_correct_norm", needs={"reference", "item"})
def _reference_correct_norm(step: StepView) -> bool:
    """The full-precision pass's length-normalised choice is the gold ending."""
    return step["reference"].pred_norm == step["item"].label

"""Reward terms (CompilerGym style) and their weighted sum.

A reward term is one class in one file: it declares its ``name``, whether it is ``deterministic``
(the same seed gives the same value) and what it ``needs`` from the environment, and turns a
:class:`StepRecord` into a float. Higher is better for every built-in term, so weights are
positive. YAML picks terms by name::

    rewards:
      loglik: 1.0
      memory: 0.5
      budget: {weight: 1.0, target_bits: 3.0}

Adding a term::

    @register_reward("my_term")
    class MyTerm(RewardTerm):
        def __call__(self, record: StepRecord) -> float:
            return -record.bits / 16
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quant.registry import Registry

REWARDS: Registry[RewardTerm] = Registry("reward term")
register_reward = REWARDS.register


@dataclass
class StepRecord:
    """What one step did, as reward terms see it.

    ``logprob_delta`` is the summed log-probability of the next block's actual tokens under the
    partly quantized cache minus the same under the full-precision reference of the same item:
    measuring against the item's own reference removes item difficulty from the signal and
    leaves the damage quantization did.
    """

    bits: int  # bits chosen for the block just committed
    max_bits: int  # the unit of bit-valued terms: 16 (fp16), whatever bits the env's menu offers
    block_tokens: int  # tokens in the committed block
    block_nbytes: int  # bytes the committed block holds (all layers, keys + values)
    block_fp16_nbytes: int  # the same block in fp16
    cache_nbytes: int  # bytes the whole committed cache holds after the commit
    cache_fp16_nbytes: int
    avg_bits: float  # token-weighted average committed bits after the commit
    logprob_delta: float  # next block's tokens (0 at the terminal step)
    scored_tokens: int  # how many tokens logprob_delta sums over
    step_seconds: float  # wall time of the step (commit + forward + features)
    terminal: bool
    # terminal only: the gold ending and the choice, under the policy's cache and under fp16
    ending_logprob_delta: float = 0.0
    correct_norm: bool = False
    reference_correct_norm: bool = False


class RewardTerm:
    name: str = ""
    deterministic: bool = True
    needs: frozenset[str] = frozenset()  # {"reference"}: needs the full-precision pass of the item

    def __init__(self, **params: Any):
        if params:
            raise TypeError(f"reward term {self.name!r} takes no parameters, got {sorted(params)}")

    def __call__(self, record: StepRecord) -> float:
        raise NotImplementedError


@register_reward("ending_loglik")
class EndingLogLikelihood(RewardTerm):
    """Terminal only: the gold ending's log-likelihood change vs full precision (nats).

    Why next to ``loglik``: on HellaSwag most of what ``loglik`` charges is damage to the prompt's
    own tokens (on pool items an alternating 2/4-bit schedule lost 12-33 nats an episode, of which the
    ending's share was 0.5-11), while the score depends on the ending alone. This term is the signal
    the evaluation actually measures, at the price of one sparse reward per episode.
    """

    needs = frozenset({"reference"})

    def __call__(self, record: StepRecord) -> float:
        return record.ending_logprob_delta if record.terminal else 0.0


@register_reward("loglik")
class LogLikelihood(EndingLogLikelihood):
    """Log-likelihood change vs full precision: next block's tokens, and the gold ending at the end (nats)."""

    def __call__(self, record: StepRecord) -> float:
        return record.logprob_delta + super().__call__(record)


@register_reward("accuracy")
class Accuracy(RewardTerm):
    """Terminal: normalised-accuracy hit relative to fp16 (+1 gained, -1 lost, 0 same)."""

    needs = frozenset({"reference"})

    def __call__(self, record: StepRecord) -> float:
        if not record.terminal:
            return 0.0
        return float(record.correct_norm) - float(record.reference_correct_norm)


@register_reward("memory")
class Memory(RewardTerm):
    """Minus the committed block's KV bytes relative to fp16 (-1 at 16 bits, about -0.28 at 4)."""

    def __call__(self, record: StepRecord) -> float:
        return -record.block_nbytes / record.block_fp16_nbytes


@register_reward("latency")
class Latency(RewardTerm):
    """Minus the measured wall time of the step in seconds: real, but nondeterministic."""

    deterministic = False

    def __call__(self, record: StepRecord) -> float:
        return -record.step_seconds


@register_reward("latency_model")
class LatencyModel(RewardTerm):
    """Deterministic latency proxy: minus the bytes attention reads from the cache, relative to fp16.

    Decoding is memory bound, so the bytes each new token's attention reads (the whole committed
    cache) predict its cost; unlike ``memory`` this charges every earlier block again at every step.
    """

    def __call__(self, record: StepRecord) -> float:
        return -record.cache_nbytes / record.cache_fp16_nbytes


@register_reward("budget")
class Budget(RewardTerm):
    """Penalty when the running average bit-width exceeds ``target_bits`` (in units of 16 bits)."""

    def __init__(self, target_bits: float = 4.0):
        if target_bits <= 0:
            raise ValueError(f"target_bits must be positive, got {target_bits}")
        self.target_bits = float(target_bits)

    def __call__(self, record: StepRecord) -> float:
        return -max(0.0, record.avg_bits - self.target_bits) / record.max_bits


@register_reward("final_budget")
class FinalBudget(Budget):
    """Terminal only: penalty when the episode's *final* average bit-width exceeds ``target_bits``.

    Why not ``budget``: that one charges the running average at every step, so keeping block 0 (the
    attention sink, by far the most sensitive block) at 4 bits is punished from the first step even
    when the episode ends under budget. A constraint on the whole episode is what "average <= 3 bits"
    means; PPO's returns carry the terminal charge back to the choices that caused it.
    """

    def __call__(self, record: StepRecord) -> float:
        return super().__call__(record) if record.terminal else 0.0


class RewardFunction:
    """The environment's reward: a weighted sum of named terms, each term's value kept for ``info``."""

    def __init__(self, spec: Mapping[str, float | Mapping[str, Any]]):
        if not spec:
            raise ValueError(f"no reward terms given; known: {', '.join(REWARDS.names())}")
        self.terms: dict[str, tuple[float, RewardTerm]] = {}
        for name, value in spec.items():
            cls = REWARDS.get(name)
            if isinstance(value, Mapping):
                params = dict(value)
                weight = float(params.pop("weight", 1.0))
            else:
                params, weight = {}, float(value)
            self.terms[name] = (weight, cls(**params))
        self.deterministic = all(term.deterministic for _, term in self.terms.values())
        self.needs: frozenset[str] = frozenset().union(*(term.needs for _, term in self.terms.values()))

    def __call__(self, record: StepRecord) -> tuple[float, dict[str, float]]:
        values = {name: float(term(record)) for name, (_, term) in self.terms.items()}
        total = sum(self.terms[name][0] * v for name, v in values.items())
        return float(total), values


DEFAULT_REWARDS: dict[str, float] = {"loglik": 1.0, "memory": 1.0}

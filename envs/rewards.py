"""Reward terms (CompilerGym style) and their weighted sum.

A reward term is one class in one file: it declares its ``name``, whether it is ``deterministic``
(the same seed gives the same value on one machine), whether it is ``platform_dependent`` (values
jitter across machines: anything measured after low-bit quantization, wall time) and the quantities
it ``needs`` (see :mod:`envs.quantities`); it turns a :class:`StepView` into a float, reading
``step.record`` (the step's scalars, always there) and ``step[name]`` for each name it declared.
The env computes only what the chosen terms need. ``reset`` lets a term keep per-episode state.
Higher is better for every built-in term, so weights are positive. YAML picks terms by name::

    rewards:
      loglik: 1.0
      memory: 0.5
      budget: {weight: 1.0, target_bits: 3.0}
      baseline_improvement: {weight: 1.0, baseline: k4v2}   # terminal: beat fixed K4V2 on the gold ending
      # ... or {weight: 1.0, baseline: k4v2, endings: all}: on the mean of all endings (gold-blind)

Adding a term::

    @register_reward("my_term")
    class MyTerm(RewardTerm):
        needs = frozenset({"logprob_delta"})

        def __call__(self, step: StepView) -> float:
            return step["logprob_delta"] - step.record.bits / 16
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from envs.latency import load_latency_table, setting_key
from envs.quantities import StepView, baseline_pass, required
from envs.settings import Setting, normalize_setting
from quant.registry import Registry

REWARDS: Registry[RewardTerm] = Registry("reward term")
register_reward = REWARDS.register


class RewardTerm:
    name: str = ""
    deterministic: bool = True
    platform_dependent: bool = False
    needs: frozenset[str] = frozenset()  # quantity names (envs.quantities.QUANTITIES)

    def __init__(self, **params: Any):
        if params:
            raise TypeError(f"reward term {self.name!r} takes no parameters, got {sorted(params)}")

    def reset(self, step: StepView) -> None:
        """Called at every episode start with the view of block 0 (``step.record`` is None)."""

    def __call__(self, step: StepView) -> float:
        raise NotImplementedError


@register_reward("ending_loglik")
class EndingLogLikelihood(RewardTerm):
    """Terminal only: the gold ending's log-likelihood change vs full precision (nats).

    Why next to ``loglik``: on HellaSwag most of what ``loglik`` charges is damage to the prompt's
    own tokens (on pool items an alternating 2/4-bit schedule lost 12-33 nats an episode, of which the
    ending's share was 0.5-11), while the score depends on the ending alone. This term is the signal
    the evaluation actually measures, at the price of one sparse reward per episode.
    """

    platform_dependent = True
    needs = frozenset({"ending_logprob_delta"})

    def __call__(self, step: StepView) -> float:
        return step["ending_logprob_delta"] if step.record.terminal else 0.0


@register_reward("prompt_loglik")
class PromptLogLikelihood(RewardTerm):
    """The next block's prompt tokens' log-likelihood change vs full precision (nats); 0 at the end.

    Why apart from ``loglik``: it is what a controller that sees only the prompt can measure of its own
    damage (the prompt is known in full at prefill), with no ending in it, so a search on it
    (``return-oracle`` with this reward, :mod:`agents.oracle`) is a per-item policy that could be deployed.
    ``tokens: N`` counts only the predictions of the prompt's last N tokens (for a few-shot prompt: the
    query the answer continues, rather than the other shots), from whichever blocks hold them.
    """

    platform_dependent = True
    needs = frozenset({"logprob_delta"})

    def __init__(self, tokens: int | None = None):
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"reward term 'prompt_loglik': tokens must be a positive integer, got {tokens!r}")
        self.tokens = tokens
        if tokens is not None:
            self.needs = frozenset({"token_logprob_deltas", "next_span", "reference"})

    def __call__(self, step: StepView) -> float:
        if step.record.terminal:
            return 0.0
        if self.tokens is None:
            return step["logprob_delta"]
        # entry i of the deltas predicts prompt token start + i + 1; the reference has one per token but the first
        first = len(step["reference"].target_logprobs) - self.tokens - step["next_span"][0]
        return float(step["token_logprob_deltas"][max(first, 0):].sum())


@register_reward("loglik")
class LogLikelihood(EndingLogLikelihood):
    """Log-likelihood change vs full precision: next block's tokens, and the gold ending at the end (nats)."""

    needs = frozenset({"logprob_delta", "ending_logprob_delta"})

    def __call__(self, step: StepView) -> float:
        return step["logprob_delta"] + super().__call__(step)


@register_reward("baseline_improvement")
class BaselineImprovement(RewardTerm):
    """Terminal only: the policy's gold-ending log-lik change vs fp16 minus that of the fixed setting
    ``baseline`` on the same item (nats) = the baseline's damage minus the policy's damage.

    CompilerGym's baseline-improvement reward: the fixed policy ``baseline`` scores exactly 0 on every
    item (its pass runs the same blocks, cache and scoring as the episode, see
    ``KVPrecisionEnv.baseline_scores``), so anything above 0 beats it on that item. The baseline pass
    is computed once per prompt and stored with the full-precision references. It is the named
    setting on every block as is: an env's ``bit_budget`` does not push it down. In the batched vector
    env the pass runs unbatched (the single env's path), so there a baseline policy's own value is 0
    up to the float noise of the batched forward. ``loglik`` and ``ending_loglik`` are unchanged.

    ``endings: all`` compares the *mean* log-likelihood of all the item's endings instead of the gold
    one's: gold-blind, so the policy is paid for remembering the prompt well for every continuation
    rather than for the quantization noise that happens to favour the answer, and each episode's
    signal averages over every ending (the ``blind-oracle``'s objective, :mod:`agents.oracle`). The
    full-precision reference is the same on both sides and cancels.
    """

    platform_dependent = True
    needs = frozenset({"ending_logprob_delta", "baseline_ending_logprob_delta"})
    ENDINGS = ("gold", "all")

    def __init__(self, baseline: str | int | Setting | None = None, endings: str = "gold"):
        if endings not in self.ENDINGS:
            raise ValueError(f"reward term 'baseline_improvement': endings must be one of {self.ENDINGS}, "
                             f"got {endings!r}")
        self.endings = endings
        if endings == "all":
            self.needs = frozenset({"ending_scores", "baseline_scores"})
        if baseline is None:
            raise ValueError(
                "reward term 'baseline_improvement' needs the fixed setting to measure against, e.g. "
                "rewards: {baseline_improvement: {weight: 1.0, baseline: k4v2}}"
            )
        try:
            self.baseline: Setting = normalize_setting(baseline)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"reward term 'baseline_improvement': baseline {baseline!r} is not a setting ({err}); "
                "write it as a width ('4') or key and value bits ('k4v2')"
            ) from None

    def __call__(self, step: StepView) -> float:
        if not step.record.terminal:
            return 0.0
        if self.endings == "all":
            return float(np.mean(step["ending_scores"]) - np.mean(baseline_pass(step)(self.baseline)))
        return step["ending_logprob_delta"] - step["baseline_ending_logprob_delta"](self.baseline)


@register_reward("accuracy")
class Accuracy(RewardTerm):
    """Terminal: normalised-accuracy hit relative to fp16 (+1 gained, -1 lost, 0 same)."""

    platform_dependent = True
    needs = frozenset({"correct_norm", "reference_correct_norm"})

    def __call__(self, step: StepView) -> float:
        if not step.record.terminal:
            return 0.0
        return float(step["correct_norm"]) - float(step["reference_correct_norm"])


@register_reward("memory")
class Memory(RewardTerm):
    """Minus the committed block's KV bytes relative to fp16 (-1 at 16 bits, about -0.28 at 4)."""

    def __call__(self, step: StepView) -> float:
        return -step.record.block_nbytes / step.record.block_fp16_nbytes


@register_reward("latency")
class Latency(RewardTerm):
    """Minus the measured wall time of the step in seconds: real, but nondeterministic."""

    deterministic = False
    platform_dependent = True

    def __call__(self, step: StepView) -> float:
        return -step.record.step_seconds


@register_reward("latency_model")
class LatencyModel(RewardTerm):
    """Deterministic latency proxy: minus the bytes attention reads from the cache, relative to fp16.

    Decoding is memory bound, so the bytes each new token's attention reads (the whole committed
    cache) predict its cost; unlike ``memory`` this charges every earlier block again at every step.
    """

    def __call__(self, step: StepView) -> float:
        return -step.record.cache_nbytes / step.record.cache_fp16_nbytes


@register_reward("latency_table")
class LatencyTableCost(RewardTerm):
    """Minus the committed block's measured decode cost per token relative to DynamicCache, read from
    a latency table of the machine at hand (``table``: a JSON file from ``experiments.bench_latency``,
    e.g. ``results/latency/cpu-....json``).

    Why beside ``latency_model``: bytes read predict decode cost only where decoding is memory bound;
    on a CPU low bits decode *slower* than fp16, on a GPU faster. The table holds what was measured,
    so the term is deterministic for a given table but platform dependent: another device needs its
    own table. The setting is read from the cache (the block's key/value bits and the cache's sink
    tokens), so the table must hold that setting (``k4v2+s4``, ...), else the step fails clearly. A
    block committed per layer group costs the mean of its groups' settings (groups are equal in size).
    """

    platform_dependent = True
    needs = frozenset({"cache"})

    def __init__(self, table: str):
        self.table = load_latency_table(table)

    def __call__(self, step: StepView) -> float:
        cache = step["cache"]
        blocks = getattr(cache, "blocks", None)
        if not blocks:
            raise ValueError(f"reward term 'latency_table' needs a MixedPrecisionKVCache with committed blocks, "
                             f"got {type(cache).__name__}")
        block = blocks[-1]
        # per layer group: groups hold equal numbers of layers, so the block's cost is their mean
        pairs = getattr(block, "group_bits", ()) or [(block.key_bits, block.value_bits)]
        return -sum(self.table.cost(setting_key(p, cache.sink_tokens)) for p in pairs) / len(pairs)


@register_reward("budget")
class Budget(RewardTerm):
    """Penalty when the running average bit-width exceeds ``target_bits`` (in units of 16 bits)."""

    def __init__(self, target_bits: float = 4.0):
        if target_bits <= 0:
            raise ValueError(f"target_bits must be positive, got {target_bits}")
        self.target_bits = float(target_bits)

    def __call__(self, step: StepView) -> float:
        return -max(0.0, step.record.avg_bits - self.target_bits) / step.record.max_bits


@register_reward("final_budget")
class FinalBudget(Budget):
    """Terminal only: penalty when the episode's *final* average bit-width exceeds ``target_bits``.

    Why not ``budget``: that one charges the running average at every step, so keeping block 0 (the
    attention sink, by far the most sensitive block) at 4 bits is punished from the first step even
    when the episode ends under budget. A constraint on the whole episode is what "average <= 3 bits"
    means; PPO's returns carry the terminal charge back to the choices that caused it.
    """

    def __call__(self, step: StepView) -> float:
        return super().__call__(step) if step.record.terminal else 0.0


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
        terms = [term for _, term in self.terms.values()]
        self.deterministic = all(term.deterministic for term in terms)
        self.platform_dependent = any(term.platform_dependent for term in terms)
        #: every quantity a step may compute for these terms (their needs and what those read in turn)
        self.quantities: frozenset[str] = frozenset().union(
            *(required(term.needs, f"reward term {name!r}") for name, (_, term) in self.terms.items())
        )

    def reset(self, step: StepView) -> None:
        """Start of an episode: each term sees block 0 through its own needs."""
        for name, (_, term) in self.terms.items():
            term.reset(self._seen_by(name, term, step))

    def __call__(self, step: StepView) -> tuple[float, dict[str, float]]:
        values = {name: float(t(self._seen_by(name, t, step))) for name, (_, t) in self.terms.items()}
        total = sum(self.terms[name][0] * v for name, v in values.items())
        return float(total), values

    @staticmethod
    def _seen_by(name: str, term: RewardTerm, step: StepView) -> StepView:
        return step.restricted(f"reward term {name!r}", term.needs)


DEFAULT_REWARDS: dict[str, float] = {"loglik": 1.0, "memory": 1.0}

"""Policies by spec string, so configs and command lines name them the same way.

Specs are ``kind`` or ``kind:arg``::

    fixed:4               FixedBitsPolicy at 4 bits
    rule                  EntropyRulePolicy with default thresholds
    rule:thresholds.yaml  ... with thresholds saved by EntropyRulePolicy.save
    rule:2.0,2.8,3.5      ... with inline thresholds
    mlp:controller.pt     MLPPolicy
    sb3:model.zip         SB3Policy (PPO);  sb3:A2C:model.zip  any other SB3 algorithm

A new kind is one decorated builder: ``@register_policy("name")`` on
``def build(arg: str | None, observation_names, bits, env) -> Policy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from agents.base import Policy
from agents.fixed import FixedBitsPolicy
from agents.rule import EntropyRulePolicy

Builder = Callable[[str | None, Sequence[str], Sequence[int], Any], Policy]
POLICY_REGISTRY: dict[str, Builder] = {}


def register_policy(kind: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under ``kind``; a name can be registered once."""

    def deco(fn: Builder) -> Builder:
        if kind in POLICY_REGISTRY:
            raise ValueError(f"policy kind {kind!r} is already registered")
        POLICY_REGISTRY[kind] = fn
        return fn

    return deco


def _need(arg: str | None, kind: str, example: str) -> str:
    if not arg:
        raise ValueError(f"policy spec {kind!r} needs an argument, e.g. {example!r}")
    return arg


@register_policy("fixed")
def _fixed(arg, observation_names, bits, env) -> Policy:
    value = _need(arg, "fixed", "fixed:4")
    try:
        width = int(value)
    except ValueError:
        raise ValueError(f"fixed bits must be an integer, got {value!r} (e.g. 'fixed:4')") from None
    return FixedBitsPolicy(observation_names, bits, width)


@register_policy("rule")
def _rule(arg, observation_names, bits, env) -> Policy:
    if not arg:
        return EntropyRulePolicy(observation_names, bits)
    try:
        thresholds = [float(t) for t in arg.split(",")]
    except ValueError:
        return EntropyRulePolicy.load(arg, observation_names, bits)
    return EntropyRulePolicy(observation_names, bits, thresholds)


@register_policy("mlp")
def _mlp(arg, observation_names, bits, env) -> Policy:
    from agents.mlp import MLPPolicy  # torch import only when needed

    return MLPPolicy(observation_names, bits, _need(arg, "mlp", "mlp:runs/controller.pt"))


@register_policy("sb3")
def _sb3(arg, observation_names, bits, env) -> Policy:
    from agents.sb3 import SB3Policy, known_algorithms

    arg = _need(arg, "sb3", "sb3:runs/ppo.zip")
    algo, sep, rest = arg.partition(":")
    if sep and algo.upper() in {a.upper() for a in known_algorithms()}:
        return SB3Policy(rest, env, algo, observation_names=observation_names, bits=bits)
    return SB3Policy(arg, env, None, observation_names=observation_names, bits=bits)


def make_policy(
    spec: str,
    observation_names: Sequence[str] | None = None,
    bits: Sequence[int] | None = None,
    env: Any = None,
) -> Policy:
    """Build the policy ``spec`` names; ``observation_names``/``bits`` default to ``env.unwrapped``'s."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in POLICY_REGISTRY:
        raise ValueError(
            f"unknown policy kind {kind!r} in spec {spec!r}; known kinds: {sorted(POLICY_REGISTRY)}"
        )
    unwrapped = getattr(env, "unwrapped", None)
    observation_names = observation_names or getattr(unwrapped, "observation_names", None)
    bits = bits or getattr(unwrapped, "bits", None)
    if observation_names is None or bits is None:
        raise ValueError("make_policy needs observation_names and bits, or an env that has them")
    return POLICY_REGISTRY[kind](arg or None, observation_names, bits, env)

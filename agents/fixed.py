"""Static precision: the baselines every adaptive policy is measured against.

A fixed spec names one menu setting and, optionally, env options: ``fixed:4``, ``fixed:k4v2``,
``fixed:k4v2+s4`` (keys at 4 bits, values at 2, the first 4 tokens kept in fp16). The options are
env settings, not policy behaviour: the policy checks that the env it acts on has them, and
``experiments.evaluate`` runs such a spec on a sibling env that has them (:func:`fixed_env_overrides`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.base import Policy
from envs.settings import Setting, normalize_setting, parse_setting, setting_name

FULL = 16  # the reference setting: fixed:16 is "fp16"


@dataclass(frozen=True)
class FixedSetting:
    """What a fixed spec asks for: a menu setting and the fp16 sink tokens of the env it runs on."""

    setting: Setting
    sink_tokens: int = 0

    @property
    def name(self) -> str:
        """``fp16``, ``fixed:4``, ``fixed:k4v2``, ``fixed:k4v2+s4``: one name per distinct run."""
        if self.setting == FULL:
            return "fp16"
        return f"fixed:{setting_name(self.setting)}" + (f"+s{self.sink_tokens}" if self.sink_tokens else "")


def fixed_setting(value: Any, sink_tokens: int = 0) -> FixedSetting:
    """A :class:`FixedSetting` from a setting (``4``, ``(4, 2)``, ``"k4v2"``) and a sink-token count.

    Sinks change nothing at 16 bits (every token is fp16 already), so the 16-bit setting drops them:
    ``fixed:16+s4`` is ``fp16``.
    """
    setting = normalize_setting(value)
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, (int, np.integer)) or sink_tokens < 0:
        raise ValueError(f"sink tokens must be an integer >= 0, got {sink_tokens!r}")
    return FixedSetting(setting, 0 if setting == FULL else int(sink_tokens))


def parse_fixed(arg: str | None) -> FixedSetting:
    """Read a fixed spec's argument: ``<setting>[+s<N>]`` (``4``, ``k4v2``, ``k4v2+s4``)."""
    if not arg:
        raise ValueError("policy spec 'fixed' needs an argument, its setting, e.g. 'fixed:4', 'fixed:k4v2' or 'fixed:k4v2+s4'")
    setting_text, *options = str(arg).split("+")
    sinks = 0
    for option in options:
        if option[:1] == "s" and option[1:].isdigit():
            sinks = int(option[1:])
        else:
            raise ValueError(
                f"unknown option {option!r} in 'fixed:{arg}'; the options are +s<N> (N fp16 sink tokens), "
                "e.g. 'fixed:k4v2+s4'"
            )
    return fixed_setting(parse_setting(setting_text), sinks)


def fixed_name(value: Any, sink_tokens: int = 0) -> str:
    """The canonical name of a fixed setting: ``fp16`` for 16 bits (the reference), else
    ``fixed:<setting>[+s<N>]`` (``fixed:4``, ``fixed:k4v2+s4``); see :class:`FixedSetting`.

    It is the spec that builds the setting, so specs, records, references and reports share one name.
    """
    return fixed_setting(value, sink_tokens).name


def fixed_env_overrides(fixed: FixedSetting, config: Any) -> dict[str, Any]:
    """Env config keys to change so an env with ``config`` runs ``fixed`` as its name says.

    ``sink_tokens`` when the env's differ (16 bits ignores sinks), ``bits: [setting]`` when the
    setting is not in the env's menu, and ``bit_budget: None`` when the env has a budget: a fixed
    setting plays everywhere as its name says (its average bits show where it sits against the
    budget), never pushed under it. Empty when the env already fits.
    """
    overrides: dict[str, Any] = {}
    if fixed.setting != FULL and fixed.sink_tokens != config.sink_tokens:
        overrides["sink_tokens"] = fixed.sink_tokens
    if fixed.setting not in {normalize_setting(b) for b in config.bits}:
        overrides["bits"] = (fixed.setting,)
    if getattr(config, "bit_budget", None) is not None:  # a budget would replace the setting on some blocks
        overrides["bit_budget"] = None
    return overrides


class FixedBitsPolicy(Policy):
    """Always commits the KV cache at one setting: ``value`` bits (16 = fp16, the reference) or a
    ``(key_bits, value_bits)`` pair, in every layer group. ``sink_tokens`` only names the run (the env
    keeps the sinks); :func:`check_env` checks the env has them."""

    def __init__(self, observation_names: Sequence[str], bits: Sequence[Any], value: Any, sink_tokens: int = 0):
        super().__init__(observation_names, bits)
        self.fixed = fixed_setting(value, sink_tokens)
        if self.fixed.setting not in self.bits:
            menu = [setting_name(b) for b in self.bits]
            raise ValueError(
                f"fixed setting {setting_name(self.fixed.setting)} is not one of the env's settings {menu}; add it to "
                "the env's bits (experiments.evaluate runs such a spec on a sibling env whose menu has it)"
            )
        self.value = self.fixed.setting
        self.action = self.bits.index(self.value)
        self.name = self.fixed.name

    def check_env(self, env: Any) -> None:
        """Raise unless ``env`` keeps the sink tokens this policy's name promises."""
        config = getattr(getattr(env, "unwrapped", env), "config", None)
        overrides = fixed_env_overrides(self.fixed, config) if config is not None else {}
        if "sink_tokens" in overrides:
            raise ValueError(
                f"{self.name} runs with sink_tokens={self.fixed.sink_tokens} but the env has "
                f"sink_tokens={config.sink_tokens}; use env.sibling(sink_tokens={self.fixed.sink_tokens}) "
                "(experiments.evaluate does) or name the policy with the env's sinks"
            )

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return np.full(len(obs2d), self.action, dtype=np.int64)

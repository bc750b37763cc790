"""Policies by spec string, so configs, command lines, records and reports name them the same way.

A spec is ``[alias=]what``, where ``what`` is one of::

    fixed:4               FixedBitsPolicy at 4 bits                       name "fixed:4"
    fixed:k4v2            ... keys at 4 bits, values at 2                 name "fixed:k4v2"
    fixed:k4v2+s4         ... on an env with 4 fp16 sink tokens           name "fixed:k4v2+s4"
    fp16                  FixedBitsPolicy at 16 bits (= fixed:16)         name "fp16"
    rule                  EntropyRulePolicy with default thresholds       name "rule"
    rule:thresholds.yaml  ... with thresholds saved by EntropyRulePolicy.save
    rule:2.0,2.8,3.5      ... with inline thresholds
    mlp:controller.pt     MLPPolicy                                       name "mlp"
    sb3:model.zip         SB3Policy (PPO)                                 name "ppo"
    sb3:A2C:model.zip     any other SB3 algorithm                         name "a2c"
    static:schedule.json  StaticSchedulePolicy (experiments.search_static) name "static"
    oracle                per-item greedy oracle, completing at the dearest
                          setting within the budget (evaluation only)     name "oracle"
    oracle:k4v2           ... completing every branch at K4V2             name "oracle:k4v2"
    oracle:schedule.json  ... completing every branch with a static
                          schedule: its headroom over that schedule       name "oracle:static"
    blind-oracle[:arg]    the oracle maximising the mean log-lik of all
                          endings, blind to the gold one (same args)      name "blind-oracle..."
    return-oracle[:arg]   the oracle maximising the env's own reward (with
                          rewards {prompt_loglik: 1}: a prompt-only search) name "return-oracle..."
    evidence              privileged evidence teacher: the answer's blocks
                          precise, the rest of the budget from the end    name "evidence"
    evidence:8            ... evidence blocks at most at 8 bits           name "evidence:8"
    select:selector.json  TokenSelectPolicy: marks tokens to keep at the
                          env's protect_bits (experiments.train_selector) name "select"
    runs/x/mlp.pt         a bare file: its kind is read from what the file is (mlp, sb3 or rule)
    pkg.module:Class      a plug-in class imported from a dotted path (``pkg.module:Class:arg``)
    my_policies:Class     ... also from a top-level module on ``sys.path`` (one file)
    kind[:arg]            a plug-in installed under the ``kvgym.policies`` entry-point group

Every policy has one canonical name (:func:`canonical_name`), which ``make_policy`` gives it as
``.name``; ``alias=`` replaces it, so two policies of one kind can sit in one comparison
(``mlp-oracle=mlp:runs/o.pt``).

A new policy is one file. The plug-in convention: a :class:`~agents.base.Policy` subclass, built as
``Class(observation_names, bits)``, or ``Class(observation_names, bits, arg)`` when the spec has an
argument; name it by dotted path in a config, or declare it as an entry point
(``[project.entry-points."kvgym.policies"] mine = "pkg.module:Class"``). Its name is
``Class.canonical_name(arg)`` if it defines that classmethod, else its own ``name`` attribute, else
the spec. Code may also register a builder function ``(arg, observation_names, bits, env) -> Policy``
with ``@register_policy("kind", name=...)``: that is how the built-in kinds, which parse their
argument or need the env, are written.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agents.base import Policy
from agents.fixed import FixedBitsPolicy, fixed_env_overrides, parse_fixed
from agents.rule import EntropyRulePolicy
from agents.sb3 import DEFAULT_ALGO
from quant.registry import Registry, UnknownNameError

Builder = Callable[[str | None, Sequence[str], Sequence[int], Any], Policy]
#: Canonical name of a kind's policy from the spec's argument, computed without building it.
Namer = Callable[[str | None], str]
#: Env config keys a spec's env options change, from the spec's argument and the env's config.
EnvOptions = Callable[[str | None, Any], dict[str, Any]]

ENTRY_POINT_GROUP = "kvgym.policies"
POLICIES: Registry[Builder | type[Policy]] = Registry("policy kind", entry_point_group=ENTRY_POINT_GROUP)

_ALIAS = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.+-]*)=(.+)$")
#: File suffix -> kind, when a bare file's content does not say what it is.
_KIND_BY_SUFFIX = {".pt": "mlp", ".pth": "mlp", ".zip": "sb3", ".yaml": "rule", ".yml": "rule", ".json": "static"}
_SNIFF_MAX_BYTES = 1 << 20  # YAML larger than this is not a thresholds file; don't parse it


def register_policy(
    kind: str, *, name: Namer | None = None, env: EnvOptions | None = None
) -> Callable[[Builder], Builder]:
    """Decorator adding a builder (or Policy subclass) under ``kind``; a name can be registered once.

    ``name`` maps the spec's argument to the policy's canonical name (default: ``kind[:arg]``).
    ``env`` maps the argument and an env config to the config keys the spec's env options change
    (``fixed:k4v2+s4`` on an env without sinks -> ``{"sink_tokens": 4, ...}``), see :func:`env_overrides`.
    """

    def deco(obj: Builder) -> Builder:
        if name is not None:
            obj.canonical_name = name
        if env is not None:
            obj.env_overrides = env
        POLICIES.add(kind, obj)
        return obj

    return deco


# ------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class PolicySpec:
    """A parsed spec: ``kind`` is a registered kind or a dotted ``module:Class``; ``arg`` may be None."""

    kind: str
    arg: str | None = None
    alias: str | None = None


def parse_spec(spec: str) -> PolicySpec:
    """Split a spec into alias, kind and argument; a bare file path becomes ``<its kind>:<path>``."""
    text = spec.strip()
    alias = None
    if match := _ALIAS.match(text):
        alias, text = match.group(1), match.group(2).strip()
    kind, sep, arg = text.partition(":")
    if not sep and _looks_like_file(text):
        return PolicySpec(kind_of_file(text), text, alias)
    if _is_module(kind, arg):
        cls_name, _, arg = arg.partition(":")
        kind = f"{kind}:{cls_name}"
    return PolicySpec(kind, arg or None, alias)


def _is_module(kind: str, arg: str) -> bool:
    """``kind:arg`` reads ``module:Class[:arg]``: a dotted module, or an importable one no kind shadows."""
    if not arg.partition(":")[0].isidentifier() or not all(p.isidentifier() for p in kind.split(".")):
        return False
    return "." in kind or (kind not in POLICIES and importlib.util.find_spec(kind) is not None)


def _looks_like_file(text: str) -> bool:
    """A path, not a kind: kinds have neither a directory nor a suffix."""
    return "/" in text or Path(text).suffix != ""


def kind_of_file(path: str | Path) -> str:
    """The policy kind a file holds: read from its content where that is cheap, else from its suffix.

    A torch archive is an MLP controller, an SB3 archive (zip with ``data`` and ``policy.pth``) is an
    SB3 agent, a YAML mapping with ``thresholds`` is a rule, a ``.json`` file a static schedule.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
        if {"data", "policy.pth"} <= set(members):
            return "sb3"
        if any(m.endswith("/data.pkl") for m in members):  # what torch.save writes
            return "mlp"
    elif path.stat().st_size <= _SNIFF_MAX_BYTES:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and "thresholds" in doc:
            return "rule"
    if path.suffix.lower() in _KIND_BY_SUFFIX:
        return _KIND_BY_SUFFIX[path.suffix.lower()]
    raise ValueError(
        f"cannot tell which policy {path} holds: expected an MLP controller (torch file, .pt), an SB3 "
        f"archive (.zip), rule thresholds (YAML with 'thresholds') or a static schedule (.json); or prefix "
        f"the kind, e.g. 'mlp:{path}'"
    )


def _entry(parsed: PolicySpec, spec: str) -> Builder | type[Policy]:
    """The registered builder/class for ``parsed.kind``, importing it if the kind is a dotted path."""
    module_name, sep, attr = parsed.kind.partition(":")
    if sep:
        obj = getattr(importlib.import_module(module_name), attr, None)
        if not (isinstance(obj, type) and issubclass(obj, Policy)):
            raise ValueError(f"policy spec {spec!r}: {parsed.kind} is not a Policy subclass")
        return obj
    try:
        return POLICIES.get(parsed.kind)
    except UnknownNameError as e:
        raise UnknownNameError(
            f"{e} (in spec {spec!r}); or a dotted path 'package.module:Class[:arg]', or a policy file"
        ) from None


def _name(parsed: PolicySpec, entry: Builder | type[Policy]) -> str:
    if parsed.alias:
        return parsed.alias
    namer = getattr(entry, "canonical_name", None)
    if callable(namer):
        return namer(parsed.arg)
    if isinstance(entry, type) and entry.name != Policy.name:
        return entry.name
    return parsed.kind if parsed.arg is None else f"{parsed.kind}:{parsed.arg}"


def canonical_name(spec: str) -> str:
    """The name the policy ``spec`` builds will carry, computed without building it.

    Spellings of one setting share a name (``fixed:16`` and ``fp16`` are both ``fp16``); an alias
    (``name=spec``) is the name itself.
    """
    parsed = parse_spec(spec)
    return _name(parsed, _entry(parsed, spec))


def env_overrides(spec: str, config: Any) -> dict[str, Any]:
    """Env config keys to change so the policy ``spec`` runs as its name says, on an env with ``config``.

    Some specs carry env settings (``fixed:k4v2+s4``: 4 fp16 sink tokens, and K4V2 in the menu); run
    them on ``env.sibling(**env_overrides(spec, env.config))`` when this is not empty. Kinds without env
    options give ``{}``.
    """
    parsed = parse_spec(spec)
    options = getattr(_entry(parsed, spec), "env_overrides", None)
    return dict(options(parsed.arg, config)) if callable(options) else {}


def make_policy(
    spec: str,
    observation_names: Sequence[str] | None = None,
    bits: Sequence[int] | None = None,
    env: Any = None,
    layer_groups: int | None = None,
) -> Policy:
    """Build the policy ``spec`` names; ``observation_names``/``bits``/``layer_groups`` default to
    ``env.unwrapped``'s (layer groups: 1). A policy that cannot act per layer group refuses ``layer_groups > 1``."""
    parsed = parse_spec(spec)
    entry = _entry(parsed, spec)
    unwrapped = getattr(env, "unwrapped", None)
    observation_names = observation_names or getattr(unwrapped, "observation_names", None)
    bits = bits or getattr(unwrapped, "bits", None)
    if observation_names is None or bits is None:
        raise ValueError("make_policy needs observation_names and bits, or an env that has them")
    name = _name(parsed, entry)  # before building: a bad argument fails before any file is read
    if isinstance(entry, type):
        extra = () if parsed.arg is None else (parsed.arg,)
        policy = entry(observation_names, bits, *extra)
    else:
        policy = entry(parsed.arg, observation_names, bits, env)
    policy.name = name
    groups = layer_groups if layer_groups is not None else getattr(unwrapped, "layer_groups", 1)
    if groups != 1:
        policy.set_layer_groups(groups)
    if getattr(unwrapped, "protect_bits", None) is not None:  # per-token marks (EnvConfig.protect_bits)
        policy.set_protect_slots(unwrapped.config.interval)
    return policy


# ------------------------------------------------------------------------------------------ built-ins
def _need(arg: str | None, kind: str, example: str) -> str:
    if not arg:
        raise ValueError(f"policy spec {kind!r} needs an argument, e.g. {example!r}")
    return arg


def _no_arg(kind: str) -> Namer:
    def namer(arg: str | None) -> str:
        if arg is not None:
            raise ValueError(f"policy spec {kind!r} takes no argument, got {kind}:{arg}")
        return kind

    return namer


def _sb3_algo(arg: str | None) -> tuple[str, str]:
    """``(algorithm, path)`` from ``[ALGO:]path``; the algorithm defaults to PPO."""
    arg = _need(arg, "sb3", "sb3:runs/ppo.zip")
    algo, sep, rest = arg.partition(":")
    return (algo, rest) if sep and algo.isidentifier() else (DEFAULT_ALGO, arg)


def _fixed_policy(fixed, observation_names, bits, env) -> Policy:
    policy = FixedBitsPolicy(observation_names, bits, fixed.setting, fixed.sink_tokens)
    if env is not None:
        policy.check_env(env)
    return policy


@register_policy(
    "fixed",
    name=lambda arg: parse_fixed(arg).name,
    env=lambda arg, config: fixed_env_overrides(parse_fixed(arg), config),
)
def _fixed(arg, observation_names, bits, env) -> Policy:
    return _fixed_policy(parse_fixed(arg), observation_names, bits, env)


@register_policy(
    "fp16", name=_no_arg("fp16"), env=lambda arg, config: fixed_env_overrides(parse_fixed("16"), config)
)
def _fp16(arg, observation_names, bits, env) -> Policy:
    return _fixed_policy(parse_fixed("16"), observation_names, bits, env)


@register_policy("rule", name=lambda arg: "rule")
def _rule(arg, observation_names, bits, env) -> Policy:
    if not arg:
        return EntropyRulePolicy(observation_names, bits)
    try:
        thresholds = [float(t) for t in arg.split(",")]
    except ValueError:
        return EntropyRulePolicy.load(arg, observation_names, bits)
    return EntropyRulePolicy(observation_names, bits, thresholds)


@register_policy("mlp", name=lambda arg: "mlp")
def _mlp(arg, observation_names, bits, env) -> Policy:
    from agents.mlp import MLPPolicy  # torch import only when needed

    return MLPPolicy(observation_names, bits, _need(arg, "mlp", "mlp:runs/controller.pt"))


@register_policy("sb3", name=lambda arg: _sb3_algo(arg)[0].lower())
def _sb3(arg, observation_names, bits, env) -> Policy:
    from agents.sb3 import SB3Policy

    algo, path = _sb3_algo(arg)
    return SB3Policy(path, env, algo, observation_names=observation_names, bits=bits)


@register_policy("static", name=lambda arg: "static")
def _static(arg, observation_names, bits, env) -> Policy:
    from agents.static import StaticSchedulePolicy

    return StaticSchedulePolicy.load(_need(arg, "static", "static:runs/search/schedule.json"), observation_names, bits)


def _oracle_name(arg: str | None, kind: str = "oracle") -> str:
    from envs.settings import parse_setting, setting_name

    if _is_schedule_file(arg):
        return f"{kind}:static"
    return kind if not arg else f"{kind}:{setting_name(parse_setting(arg))}"


def _is_schedule_file(arg: str | None) -> bool:
    """``oracle:<arg>`` completes with a static schedule file rather than a setting."""
    return bool(arg) and arg.endswith(".json")


@register_policy("oracle", name=_oracle_name)
def _oracle(arg, observation_names, bits, env, objective: str = "gold") -> Policy:
    from agents.oracle import OraclePolicy

    if _is_schedule_file(arg):
        from agents.static import StaticSchedulePolicy

        completion = StaticSchedulePolicy.load(arg, observation_names, bits)
        return OraclePolicy(observation_names, bits, completion=completion, objective=objective)
    return OraclePolicy(observation_names, bits, completion=arg or None, objective=objective)


@register_policy("blind-oracle", name=lambda arg: _oracle_name(arg, "blind-oracle"))
def _blind_oracle(arg, observation_names, bits, env) -> Policy:
    return _oracle(arg, observation_names, bits, env, objective="endings")


@register_policy("return-oracle", name=lambda arg: _oracle_name(arg, "return-oracle"))
def _return_oracle(arg, observation_names, bits, env) -> Policy:
    return _oracle(arg, observation_names, bits, env, objective="return")


def _evidence_name(arg: str | None) -> str:
    from envs.settings import parse_setting, setting_name

    return "evidence" if not arg else f"evidence:{setting_name(parse_setting(arg))}"


@register_policy("evidence", name=_evidence_name)
def _evidence(arg, observation_names, bits, env) -> Policy:
    from agents.evidence import EvidencePolicy

    return EvidencePolicy(observation_names, bits, evidence_setting=arg or None)


@register_policy("select", name=lambda arg: "select")
def _select(arg, observation_names, bits, env) -> Policy:
    from agents.token_select import TokenSelectPolicy

    return TokenSelectPolicy(observation_names, bits, _need(arg, "select", "select:runs/train_selector/selector.json"))

"""Menu entries ("settings") of the KV-precision env: how a setting is written, read and named.

A *setting* is what one action commits a block at: an int ``b`` (keys and values at ``b`` bits) or
a ``(key_bits, value_bits)`` pair, each width one the cache supports (2, 3, 4, 8, 16). A pair with
equal halves *is* the int, so ``[4, 4]`` and ``4`` are one setting with one name. This module is
the one place that knows the spelling: configs write ``bits: [2, [4, 2], 4, [8, 4], 16]``, names
read ``"4"`` and ``"k4v2"`` (as in the literature's "K4V2"), and policies, records and reports
use these names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from quant.kv_cache import BlockBits, bit_pair

__all__ = [
    "FULL_BITS",
    "Setting",
    "mean_bits",
    "normalize_menu",
    "normalize_setting",
    "parse_setting",
    "setting_name",
    "settings_by_cost",
]

#: The unit of every bit-valued feature, reward and budget: an uncompressed (fp16) cache, and the bits
#: a protected sink token counts. Features divide by this, not by the largest bits of the env's menu, so
#: ``last_bits * 16`` is the bit-width whatever ``bits`` the env offers (a policy trained with one menu
#: reads the same numbers under another).
FULL_BITS = 16

#: A normalized setting: an int when keys and values share the width, else a (key_bits, value_bits) tuple.
Setting = int | tuple[int, int]

_PAIR_NAME = re.compile(r"^k(\d+)v(\d+)$")


def normalize_setting(setting: BlockBits) -> Setting:
    """The canonical form of a setting: ``4`` and ``[4, 4]`` -> ``4``, ``[4, 2]`` -> ``(4, 2)``.

    Unsupported widths raise ValueError (naming the supported ones); a string is read by
    :func:`parse_setting`.
    """
    if isinstance(setting, str):
        return parse_setting(setting)
    k, v = bit_pair(setting)
    return k if k == v else (k, v)


def normalize_menu(bits: Iterable[BlockBits]) -> tuple[Setting, ...]:
    """A menu of settings, normalized; empty or repeated entries are an error (one action per setting)."""
    menu = tuple(normalize_setting(b) for b in bits)
    if not menu:
        raise ValueError("bits must list at least one setting, e.g. [2, [4, 2], 4, 8, 16]")
    twice = sorted({setting_name(s) for s in menu if menu.count(s) > 1})
    if twice:
        raise ValueError(f"bits lists the setting(s) {twice} more than once; list each once (got {list(bits)})")
    return menu


def setting_name(setting: BlockBits) -> str:
    """``"4"`` for 4 (or [4, 4]), ``"k4v2"`` for keys at 4 and values at 2 bits."""
    s = normalize_setting(setting)
    return str(s) if isinstance(s, int) else f"k{s[0]}v{s[1]}"


def parse_setting(text: str) -> Setting:
    """The setting a name spells: ``"4"`` -> 4, ``"k4v2"`` -> (4, 2), ``"k4v4"`` -> 4."""
    raw = str(text).strip().lower()
    match = _PAIR_NAME.match(raw)
    try:
        if match:
            return normalize_setting((int(match.group(1)), int(match.group(2))))
        if raw.isdigit():
            return normalize_setting(int(raw))
    except ValueError as err:
        raise ValueError(f"setting {text!r}: {err}") from None
    raise ValueError(f"cannot read setting {text!r}: write the bits as an integer (e.g. '4') or key and value bits (e.g. 'k4v2')")


def _halves(setting: BlockBits) -> tuple[int, int]:
    """Key and value bits without checking the widths (a policy may be built on placeholder widths)."""
    if isinstance(setting, (int, float)) or getattr(setting, "ndim", 1) == 0:
        return int(setting), int(setting)
    k, v = setting
    return int(k), int(v)


def mean_bits(setting: BlockBits) -> float:
    """Bits per K/V element of a setting where keys and values are the same size (Llama-style caches)."""
    k, v = _halves(setting)
    return (k + v) / 2


def settings_by_cost(menu: Sequence[Setting]) -> list[int]:
    """Indices of ``menu`` from the cheapest setting to the dearest.

    Order: by mean bits; at equal mean bits the setting with *more key bits* comes first, i.e. counts
    as cheaper to pick (K4V2 before K2V4): keys are the sensitive half (KIVI, arXiv 2502.15075), so a
    policy that asks for some average precision gets it spent on keys.
    """
    return sorted(range(len(menu)), key=lambda i: (mean_bits(menu[i]), -_halves(menu[i])[0]))

"""Latency tables: each cache setting's measured decode cost per token on one device.

Why a table and not a formula: what low bits cost at decode time depends on the machine. On a
2-core CPU a 2- or 4-bit block decodes a few percent *slower* than fp16 (the dequantize is extra
work and memory is not the bottleneck), a mixed-bits cache slower still, while on a GPU low bits
should be faster. ``experiments.bench_latency`` measures every setting against transformers'
``DynamicCache`` side by side and writes one JSON table per device, labelled with the fingerprint
of what measured it; the ``latency_table`` reward term charges from it, so a reward that "trades
log-likelihood against latency" uses real costs of the machine at hand rather than a bytes proxy.

A table's ``settings`` map a setting key (:func:`setting_key`: ``"4"``, ``"k4v2"``, ``"k4v2+s4"``,
``"16"``; ``"mixed"`` for a cache cycling 2/4/8/16) to at least ``relative_decode_cost``: the
median over interleaved rounds of (decode time with this cache) / (decode time with DynamicCache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envs.settings import setting_name

TABLE_KIND = "kvgym latency table"


def setting_key(bits: Any, sink_tokens: int = 0) -> str:
    """The table key of a block setting (an int or a ``(key_bits, value_bits)`` pair, named by
    :func:`envs.settings.setting_name`) with
    ``sink_tokens`` fp16 sink tokens: ``4``, ``k4v2``, ``k4v2+s4``; 16 bits is ``16`` with or
    without sinks (sinks change nothing when everything is fp16)."""
    name = setting_name(bits)
    if sink_tokens and name != "16":
        name += f"+s{int(sink_tokens)}"
    return name


@dataclass(frozen=True)
class LatencyTable:
    """One device's measured relative decode costs, read from the JSON ``bench_latency`` writes."""

    path: Path
    label: str
    costs: dict[str, float]  # setting key -> relative decode cost per token (DynamicCache = 1)
    meta: dict[str, Any]  # what measured it: fingerprint, context, threads, ...

    def cost(self, key: str) -> float:
        """Relative decode cost of setting ``key``; a setting the table lacks is a clear error."""
        try:
            return self.costs[key]
        except KeyError:
            raise KeyError(
                f"latency table {self.path} ({self.label}) has no setting {key!r}; it has "
                f"{sorted(self.costs)}. Measure it: python -m experiments.bench_latency (see its --help)"
            ) from None


def load_latency_table(path: str | Path) -> LatencyTable:
    """Read and check a latency table; a missing file or one of another shape is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no latency table at {path}; write one for this machine with "
            "`python -m experiments.bench_latency` (tables are committed under results/latency/)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("kind") != TABLE_KIND:
            raise ValueError(f"kind is {data.get('kind')!r}, not {TABLE_KIND!r}")
        costs = {key: float(entry["relative_decode_cost"]) for key, entry in data["settings"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{path} is not a latency table written by experiments.bench_latency ({exc})") from None
    meta = {k: v for k, v in data.items() if k != "settings"}
    return LatencyTable(path, str(data.get("label", path.stem)), costs, meta)

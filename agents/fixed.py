"""Static precision: the baselines every adaptive policy is measured against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agents.base import Policy


def fixed_name(value: int) -> str:
    """The canonical name of a fixed setting: ``fp16`` for 16 bits (the reference), else ``fixed:<bits>``.

    It is the spec that builds the setting, so specs, records, references and reports share one name.
    Settings with options (e.g. a key/value split or sink tokens) get their canonical spelling here.
    """
    return "fp16" if int(value) == 16 else f"fixed:{int(value)}"


class FixedBitsPolicy(Policy):
    """Always keeps the KV cache at ``value`` bits (16 = fp16, the reference)."""

    def __init__(self, observation_names: Sequence[str], bits: Sequence[int], value: int):
        super().__init__(observation_names, bits)
        if int(value) not in self.bits:
            raise ValueError(f"fixed bits {value} is not one of the env's bit-widths {self.bits}")
        self.value = int(value)
        self.action = self.bits.index(self.value)
        self.name = fixed_name(self.value)

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return np.full(len(obs2d), self.action, dtype=np.int64)

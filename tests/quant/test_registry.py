"""The one registry class: classes and functions by name, duplicate and unknown names, entry points."""

from __future__ import annotations

import importlib.metadata

import pytest

from quant.registry import Registry, UnknownNameError


def test_registers_classes_and_functions():
    reg: Registry = Registry("thing")

    @reg.register("klass")
    class Klass:
        pass

    @reg.register("func")
    def func(x):
        return x + 1

    assert reg.get("klass") is Klass and Klass.name == "klass"  # a class learns its config name
    assert reg.get("func")(1) == 2 and not hasattr(func, "name")
    assert reg.names() == ["func", "klass"] == list(reg) and "func" in reg and "other" not in reg
    reg.unregister("func")
    assert reg.names() == ["klass"]


def test_duplicate_names_are_an_error_and_keep_the_first():
    reg: Registry = Registry("thing")
    reg.register("a")(len)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(max)
    assert reg.get("a") is len


def test_unknown_names_list_the_known_ones():
    reg: Registry = Registry("reward term")
    reg.register("loglik")(len)
    reg.register("memory")(len)
    with pytest.raises(UnknownNameError, match="unknown reward term 'logilk'; known: loglik, memory") as info:
        reg.get("logilk")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_entry_points_load_lazily_only_the_name_asked_for(monkeypatch):
    loaded = []

    class FakeEntryPoint:
        def __init__(self, name):
            self.name = name

        def load(self):
            loaded.append(self.name)
            return str.upper

    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group: [FakeEntryPoint("up"), FakeEntryPoint("broken")] if group == "kvgym.things" else [],
    )
    reg: Registry = Registry("thing", entry_point_group="kvgym.things")
    assert "up" not in reg and loaded == []
    assert reg.get("up")("x") == "X" and loaded == ["up"] and "up" in reg
    with pytest.raises(UnknownNameError, match="known: broken, up"):
        reg.get("down")
    assert Registry("thing").names() == []  # without a group no entry point is consulted

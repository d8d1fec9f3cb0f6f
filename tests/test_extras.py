"""The optional extras: one table of their modules, one check with its install line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from anti_i2v import extras
from anti_i2v.errors import ConfigError


def test_every_extra_checked_is_one_the_package_declares():
    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(extras.EXTRA_MODULES) <= set(declared)


def test_a_missing_module_ends_with_the_install_line(monkeypatch):
    monkeypatch.setitem(extras.EXTRA_MODULES, "web", ("gradio", "no_such_module_anti_i2v"))
    assert extras.missing_modules("web") == ["no_such_module_anti_i2v"]
    with pytest.raises(ConfigError, match=r"checking needs the web extra \(missing no_such_module_anti_i2v\): "
                                          r"pip install 'anti-i2v\[web\]'"):
        extras.require_extra("web", "checking")
    extras.require_extra("eval", "verify")  # installed with the tests: nothing to say

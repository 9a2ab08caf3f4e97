"""insight/options.py: the `[insight]` extra's check names every missing package and the pip command, in one line."""

from __future__ import annotations

import importlib

import pytest

from bdh_lightning.insight import options
from bdh_lightning.insight.options import MissingExtra, require_extra


def without(monkeypatch, *missing):
    real, asked = importlib.import_module, []

    def import_module(name, *args, **kwargs):
        asked.append(name)
        if name in missing:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(options.importlib, "import_module", import_module)
    return asked


def test_every_missing_package_is_named_with_the_pip_command(monkeypatch):
    asked = without(monkeypatch, "networkx", "scipy")
    with pytest.raises(MissingExtra) as error:
        require_extra("inspect.every_n_validations")
    assert str(error.value) == "inspect.every_n_validations needs networkx, scipy: pip install 'bdh-lightning[insight]'"
    assert asked == ["matplotlib", "networkx", "scipy"] and error.value.exit_code == 2


def test_the_default_feature_is_inspect(monkeypatch):
    without(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtra, match=r"^inspect needs matplotlib: pip install 'bdh-lightning\[insight\]'$"):
        require_extra()


def test_with_the_extra_installed_nothing_is_raised(monkeypatch):
    assert without(monkeypatch) == [] and require_extra() is None

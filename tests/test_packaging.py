"""Packaging: one `rlhf_mesh` namespace, every package installed, nothing plain installed."""

from __future__ import annotations

import tomllib

from support import ROOT


def _config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    setuptools = _config()
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((name, *rel.parts)))
    assert found == listed


def test_everything_lives_under_rlhf_mesh():
    setuptools = _config()
    assert all(p == "rlhf_mesh" or p.startswith("rlhf_mesh.") for p in setuptools["packages"])
    assert all(p == "rlhf_mesh" or p.startswith("rlhf_mesh.") for p in setuptools["package-dir"])

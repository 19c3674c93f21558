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


def test_the_clients_need_no_server_code():
    """Importing every client pulls in none of the server's dependencies (health, metrics, settings)."""
    import subprocess

    from support import PYTHON

    probe = ("import sys, rlhf_mesh.clients, rlhf_mesh.clients.push, rlhf_mesh.clients.learner; "
             "print(sorted(m for m in ('rlhf_mesh.server', 'prometheus_client', 'pydantic_settings', 'vllm', "
             "'transformers', 'rlhf_mesh.services') if m in sys.modules))")
    result = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

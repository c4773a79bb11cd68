"""What `pip install .` ships: every package folder of converter/ is listed in pyproject.toml (a
folder left out installs without error and fails on first import, in the user's hands only: the
editable install the developers use finds it anyway)."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_package_folder_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"wan2diffusers" + "".join("." + part for part in p.parent.relative_to(ROOT / "converter").parts)
               for p in (ROOT / "converter").rglob("__init__.py")}
    assert folders - listed == set()

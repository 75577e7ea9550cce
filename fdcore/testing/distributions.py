"""Installed-looking plugin distributions for tests, without pip.

:func:`plugin_site` writes a folder holding a ``.dist-info`` (name, version and ``fdcore``
entry points) and, optionally, the plugin's modules; put the folder on ``PYTHONPATH`` of a
child process (``fdcore serve``, ``fdcore engine``, ``fdcore plugins``) and that process finds
the plugin exactly as it finds a pip-installed one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def plugin_site(
    directory: Path, distribution: str, entry_points: Mapping[str, str],
    modules: Mapping[str, str] | None = None, version: str = "0.1",
) -> Path:
    """Write ``distribution`` (its ``entry_points``: plugin name -> module) and ``modules``
    (module name -> source) under ``directory``; return ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    info = directory / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[fdcore]\n{lines}")
    for module, source in (modules or {}).items():
        (directory / f"{module}.py").write_text(source)
    return directory


def pythonpath(*folders: Path | str) -> str:
    """``folders`` before the current ``PYTHONPATH``, joined for the environment."""
    parts = [str(f) for f in folders]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)

"""``pip install fdcore`` without the ``engine`` extra: the router, the plugin host, the testing
kit and every default plugin work; ``fdcore engine`` says which extra to install.

The processes run in the test's own virtual environment, where the engine extra *is* installed,
with a ``sitecustomize`` on ``PYTHONPATH`` whose meta-path finder refuses the extra's top-level
modules (:data:`fdcore.cli.ENGINE_MODULES`) with ``ModuleNotFoundError``: what an import meets
when the distribution is absent. A second virtual environment installed without the extra would
be the literal check, but building one costs minutes of resolving and installing on every run;
the finder gives the same answer to every import statement, ``importlib.import_module`` and
``importlib.util.find_spec``, in every interpreter started with that ``PYTHONPATH`` (console
script or ``-m``). The ``pyproject.toml`` tests below keep the blocked list and the extra equal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from fdcore.cli import ENGINE_DISTRIBUTIONS, ENGINE_MODULES
from fdcore.testing.cluster import RouterFactory
from fdcore.testing.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = f"""\
import sys

BLOCKED = frozenset({sorted(ENGINE_MODULES)!r})


class RefuseEngineExtra:
    \"\"\"Refuses the engine extra's modules as an interpreter without them would.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, RefuseEngineExtra())
"""
# Imports every router-side module and default plugin; prints what failed, one per line.
IMPORT_ALL = """\
import importlib, pkgutil, sys
from importlib.metadata import entry_points

import fdcore, fdcore_plugins

try:
    import torch
except ModuleNotFoundError:
    pass
else:
    sys.exit("the blocker let torch through")
names = [ep.value for ep in entry_points(group="fdcore")
         if ep.dist is not None and ep.dist.metadata["Name"] == "fdcore"]
for package in (fdcore, fdcore_plugins):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.startswith(("fdcore.engine.", "fdcore.__main__")):
            names.append(info.name)
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
"""


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.fixture
def light_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables under which the engine extra cannot be imported."""
    site = tmp_path / "light-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(site)}


def _run(light_env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    # The timeout only ends a hung run; no outcome depends on it.
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          env={**os.environ, **light_env}, timeout=120)


def test_blocked_modules_are_the_engine_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert _requirement_names(extras["engine"]) == set(ENGINE_DISTRIBUTIONS)
    assert not _requirement_names(project["dependencies"]) & set(ENGINE_DISTRIBUTIONS)
    assert "fdcore[engine]" in extras["test"]  # `pip install -e '.[test]'` gets the engine


def test_router_side_modules_and_default_plugins_import(light_env: dict[str, str]) -> None:
    result = _run(light_env, "-c", IMPORT_ALL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"imports that need the engine extra:\n{result.stdout}"


def test_plugins_command_lists_every_default_plugin(light_env: dict[str, str]) -> None:
    result = _run(light_env, "-m", "fdcore", "plugins")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    defaults = {ep.name for ep in entry_points(group="fdcore")
                if ep.dist is not None and ep.dist.metadata["Name"] == "fdcore"}
    assert defaults <= listed


def test_serve_answers_and_stops_cleanly(
    light_env: dict[str, str], router: RouterFactory, tmp_path: Path
) -> None:
    register = tmp_path / "register.yaml"
    register.write_text(yaml.safe_dump({"instances": [
        {"role": "mixed", "host_ip": "127.0.0.1", "port": free_port()},
    ]}))
    # Started only once /health answers 200.
    serving = router(env=light_env, manager={"register-path": str(register)},
                     scheduler={"policy": "cache_aware"})
    assert serving.proc.stop() == 0
    output = serving.proc.output()
    assert "Traceback" not in output
    assert '"draining"' in output


@pytest.mark.parametrize("args", [
    ["engine", "--model", "sim", "--host", "127.0.0.1", "--port", "0"],
    ["models", "pull", "--dest", "."],
], ids=["engine", "models-pull"])
def test_engine_commands_name_the_extra(light_env: dict[str, str], args: list[str]) -> None:
    result = _run(light_env, "-m", "fdcore", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fdcore: error: the engine extra is not installed (missing: ")
    assert lines[0].endswith("pip install 'fdcore[engine]'")

"""``fdcore plugins`` as a plugin author meets it: a broken plugin is listed, not fatal; JSON
and options; ``--debug``; and a policy of an installed but not enabled plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fdcore.testing.distributions import plugin_site, pythonpath

GOOD = '''
import fdcore
from fdcore.bases import BasePolicy
from fdcore.types import StrictModel


class FirstConfig(StrictModel):
    first_bias: int = 3


class First(BasePolicy[FirstConfig]):
    name = "first"
    Config = FirstConfig

    async def select(self, request, candidates):
        return candidates[0]


@fdcore.hookimpl
def fdcore_register_policies(register):
    register.add_policy(First)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plugin_site(
        tmp_path_factory.mktemp("site"), "shaky-plugins",
        {"good_one": "good_one", "broken_one": "broken_one"},
        {"good_one": GOOD, "broken_one": "import not_a_module_anywhere\n"},
    )


def fdcore(site: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": pythonpath(site)}
    env.pop("FDCORE_DEBUG", None)
    if debug:
        env["FDCORE_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "fdcore", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_all_lists_every_plugin_and_marks_the_broken_one(site: Path) -> None:
    result = fdcore(site, "plugins", "--plugins", "all")
    assert result.returncode == 1
    rows = {line.split()[0]: line for line in result.stdout.splitlines()
            if not line.startswith(" ")}
    assert "round_robin" in rows and "good_one" in rows
    assert "FAILED: failed to import: ModuleNotFoundError" in rows["broken_one"]
    assert "shaky-plugins 0.1" in rows["broken_one"]
    assert "    policy first: first-bias (int, default 3)" in result.stdout
    assert "1 plugin(s) failed to load: broken_one" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(site: Path) -> None:
    result = fdcore(site, "plugins", "--plugins", "all", debug=True)
    assert "Traceback (most recent call last)" in result.stderr
    assert "not_a_module_anywhere" in result.stderr
    flag = fdcore(site, "--debug", "plugins", "--plugins", "broken_one")
    assert "Traceback (most recent call last)" in flag.stderr


def test_json_carries_errors_components_and_options(site: Path) -> None:
    result = fdcore(site, "plugins", "--plugins", "all", "--json")
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["broken_one"]["error"].startswith("failed to import")
    [component] = plugins["good_one"]["components"]
    assert component["family"] == "policy" and component["name"] == "first"
    assert component["options"] == [{"key": "first-bias", "type": "int", "default": 3,
                                      "required": False, "description": ""}]


def test_a_policy_of_an_installed_plugin_that_is_not_enabled(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("scheduler:\n  policy: first\n")
    result = fdcore(site, "serve", "--config", str(config))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "unknown policy 'first'" in line
    assert "registered by plugin 'good_one' (shaky-plugins 0.1)" in line
    assert "--plugins default,good_one" in line


def test_a_failed_import_at_serve_is_one_line_unless_debug(site: Path) -> None:
    result = fdcore(site, "serve", "--plugins", "default,broken_one")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("fdcore: error: plugin 'broken_one' (shaky-plugins 0.1, broken_one) "
                           "failed to import: ModuleNotFoundError")
    debug = fdcore(site, "serve", "--plugins", "default,broken_one", debug=True)
    assert "Traceback (most recent call last)" in debug.stderr

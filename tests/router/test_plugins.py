"""Plugin loading: entry points, selection, block list, failures, the example distribution."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fdcore_plugins.policies.round_robin import RoundRobinPolicy

import fdcore
from fdcore.errors import StartupError
from fdcore.plugins import load_plugins, parse_plugin_spec
from fdcore.registry import Register
from fdcore.testing.distributions import plugin_site, pythonpath
from fdcore.types import EmptyConfig, Instance, StrictModel
from tests.router.conftest import RouterFactory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fdcore-example-policy"


def fdcore_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``fdcore`` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fdcore", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_defaults_load_through_entry_points() -> None:
    loaded = load_plugins("default")
    by_name = {p.name: p for p in loaded.plugins}
    assert by_name["round_robin"].distribution == "fdcore"
    assert by_name["round_robin"].module == "fdcore_plugins.policies.round_robin"
    assert "round_robin" in loaded.registry.names("policy")
    assert "http" in loaded.registry.names("health_check")


def test_plugin_spec_parsing() -> None:
    assert parse_plugin_spec("default, pinned,default") == ["default", "pinned"]
    assert parse_plugin_spec("") == ["default"]
    assert parse_plugin_spec(["default", "a,b"]) == ["default", "a", "b"]


def test_block_list_removes_a_plugin() -> None:
    loaded = load_plugins("default", block=["random"])
    assert "random" not in loaded.registry.names("policy")
    assert "round_robin" in loaded.registry.names("policy")


def test_unknown_plugin_names_what_is_installed() -> None:
    with pytest.raises(StartupError, match=r"plugin 'nope' is not installed \(installed: .*round_robin"):
        load_plugins("default,nope")


class _Clash:
    @fdcore.hookimpl
    def fdcore_register_policies(self, register: Register) -> None:
        register.add_policy(RoundRobinPolicy)


def test_duplicate_name_names_both_plugins() -> None:
    with pytest.raises(StartupError, match="registered twice: by plugin 'round_robin' and by "
                                           "plugin 'clash'"):
        load_plugins("default", extra=[("clash", _Clash())])


class _NoSelect:
    name: ClassVar[str] = "broken"
    Config: ClassVar[type[StrictModel]] = EmptyConfig


class _Incomplete:
    @fdcore.hookimpl
    def fdcore_register_policies(self, register: Register) -> None:
        register.add_policy(_NoSelect)


def test_component_must_follow_its_protocol() -> None:
    with pytest.raises(StartupError, match="does not follow SelectionPolicy: no start, stop, "
                                           "select, release, forget"):
        load_plugins("default", extra=[("incomplete", _Incomplete())])


class _Misspelled:
    @fdcore.hookimpl
    def fdcore_register_polices(self, register: Register) -> None:
        """A typo'd hook name."""


def test_misspelled_hook_is_caught() -> None:
    with pytest.raises(StartupError, match=r"plugin 'typo'.*is invalid.*fdcore_register_polices"):
        load_plugins("default", extra=[("typo", _Misspelled())])


def _fake_distribution(tmp_path: Path, body: str) -> dict[str, str]:
    """A distribution ``broken-plugin 0.3`` on PYTHONPATH with an entry point ``broken``."""
    site = plugin_site(tmp_path, "broken-plugin", {"broken": "broken_plugin_mod"},
                       {"broken_plugin_mod": body}, version="0.3")
    return {**os.environ, "PYTHONPATH": pythonpath(site)}


def test_import_failure_stops_startup_naming_the_plugin(tmp_path: Path) -> None:
    env = _fake_distribution(tmp_path, "import does_not_exist_anywhere\n")
    result = fdcore_cli("plugins", "--plugins", "default,broken", env=env)
    assert result.returncode == 2
    assert "plugin 'broken' (broken-plugin 0.3, broken_plugin_mod) failed to import: " \
           "ModuleNotFoundError" in result.stderr
    assert "Traceback" not in result.stderr
    # The same plugin blocked: start-up goes on.
    result = fdcore_cli("plugins", "--plugins", "default,broken", "--block-plugins", "broken",
                        env=env)
    assert result.returncode == 0, result.stderr
    # Not selected: never imported.
    assert fdcore_cli("plugins", env=env).returncode == 0


def test_plugins_command_lists_versions_and_components() -> None:
    result = fdcore_cli("plugins")
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("round_robin "))
    assert f"fdcore {fdcore.__version__}" in line and "policy round_robin" in line


@pytest.fixture(scope="module")
def example_installed() -> Iterator[None]:
    """pip-install the example plugin distribution into this environment for the module."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet",
                    "fdcore-example-policy"], check=True, capture_output=True, timeout=300)


def test_example_plugin_is_listed(example_installed: None) -> None:
    result = fdcore_cli("plugins", "--plugins", "default,pinned")
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("pinned "))
    assert "fdcore-example-policy 0.1.0" in line and "policy pinned" in line
    # Not part of the default set.
    assert "pinned " not in fdcore_cli("plugins").stdout


async def test_example_plugin_routes_from_yaml(
    example_installed: None, backends, router: RouterFactory
) -> None:
    first, second = backends(2)
    r = router([first, second], plugins={"enable": ["default", "pinned"]},
               scheduler={"policy": "pinned", "pinned-port": second.port})
    await r.wait_healthy(2)
    for _ in range(5):
        status, _, headers = await r.post("/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "x"}]})
        assert status == 200
        assert headers["x-router-instance-url"] == second.url


class NullTransport:
    """A transport that copies nothing (stands in for a real one in this registry test)."""

    name: ClassVar[str] = "null"
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    def allocate(self, layout: Any) -> None:
        """Leave the pool to the engine."""

    async def expose(self) -> dict[str, Any]:
        """Nothing to reach."""
        return {}

    async def connect(self, handle: Mapping[str, Any]) -> NullLink:
        """A link that copies nothing."""
        return NullLink()


class NullLink:
    """Copies nothing."""

    async def write(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                    layers: Sequence[int] | None = None) -> int:
        """Copy nothing."""
        return 0

    async def close(self) -> None:
        """Nothing to close."""


class AlwaysHealthy:
    """A health check that trusts every instance."""

    name: ClassVar[str] = "always"
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Healthy."""
        return True, "trusted"


class ExtraPlugin:
    """Registers one component of each of the transport and health-check families."""

    @fdcore.hookimpl
    def fdcore_register_transports(self, register: Register) -> None:
        register.add_transport(NullTransport)

    @fdcore.hookimpl
    def fdcore_register_health_checks(self, register: Register) -> None:
        register.add_health_check(AlwaysHealthy)


def test_transport_and_health_check_hooks_fill_the_registry() -> None:
    loaded = load_plugins("default", extra=[("extra", ExtraPlugin())])
    assert loaded.registry.get("transport", "null").plugin == "extra"
    assert loaded.registry.get("health_check", "always").cls is AlwaysHealthy
    info = next(p for p in loaded.plugins if p.name == "extra")
    assert {(c.family, c.name) for c in info.components} == {
        ("transport", "null"), ("health_check", "always"),
    }

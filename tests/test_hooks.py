"""Every hookspec is documented, tested, and fills the registry it promises."""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

import fdcore
from fdcore import hookspecs
from fdcore.plugins import load_plugins
from fdcore.registry import Register
from fdcore.types import EmptyConfig, Instance, StrictModel, TransferTarget

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("fdcore_"))


def test_there_are_four_hook_families() -> None:
    assert HOOKS == [
        "fdcore_register_health_checks", "fdcore_register_policies",
        "fdcore_register_schedulers", "fdcore_register_transports",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert ":param register:" in doc and ":return:" in doc and "Called" in doc
    assert f"### `{hook}`" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    this = Path(__file__).resolve()
    users = [p for p in (ROOT / "tests").rglob("test_*.py")
             if p.resolve() != this and re.search(rf"\b{hook}\b", p.read_text())]
    assert users, f"no test exercises {hook}"


class NullTransport:
    """A transport that copies nothing (stands in for a real one in this registry test)."""

    name: ClassVar[str] = "null"
    Config: ClassVar[type[StrictModel]] = EmptyConfig

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def send_blocks(self, target: TransferTarget, src_block_ids: Sequence[int],
                          dst_block_ids: Sequence[int]) -> None:
        """Copy nothing."""


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

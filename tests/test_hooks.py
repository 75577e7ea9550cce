"""Every hookspec is documented, tested, and fills the registry it promises."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from fdcore import hookspecs

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

"""The plugin under test, for fdcore's pytest plugin (``fdcore.testing``).

Overriding ``fdcore_plugin`` makes the ``fdcore_plugins`` fixture load this plugin beside the
default ones, exactly as ``--plugins default,pinned`` does after ``pip install``.
"""

from typing import Any

import fdcore_example_policy
import pytest


@pytest.fixture
def fdcore_plugin() -> Any:
    return ("pinned", fdcore_example_policy)

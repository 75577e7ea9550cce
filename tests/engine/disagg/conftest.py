"""P and D sim engines as real processes, paired over loopback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fdcore.testing import free_port
from tests.engine.conftest import Engine

# Short deadlines so fault tests end quickly; long enough for this machine's slow steps.
HOLD_SECS = 2.0
FIRST_CONTACT_SECS = 4.0


def pd_flags(role: str, port: int, protocols: str, *extra: str) -> list[str]:
    """Flags of one half of a pair."""
    return ["--splitwise-role", role, "--pd-comm-port", str(port),
            "--cache-transfer-protocol", protocols, "--pd-hold-secs", str(HOLD_SECS),
            "--pd-first-contact-secs", str(FIRST_CONTACT_SECS), *extra]


@pytest.fixture(scope="session")
def start_pd(start_engine: Callable[..., Engine]) -> Callable[..., tuple[Engine, Engine]]:
    """``start_pd(protocols, *flags, p_flags=(), d_flags=(), ...)`` starts a P and a D engine
    (their own flags, sim profiles and P's environment apart); each gets its ``pd_port``."""

    def start(protocols: str = "ipc,tcp", *flags: str, p_flags: tuple[str, ...] = (),
              d_flags: tuple[str, ...] = (), model: str = "sim", p_profile: Path | None = None,
              d_profile: Path | None = None,
              p_env: dict[str, str] | None = None) -> tuple[Engine, Engine]:
        engines = []
        for role, own, profile, env in (("prefill", p_flags, p_profile, p_env),
                                        ("decode", d_flags, d_profile, None)):
            port = free_port()
            engine = start_engine(*pd_flags(role, port, protocols), *flags, *own, model=model,
                                  profile=profile, env=env)
            engine.pd_port = port
            engines.append(engine)
        return engines[0], engines[1]

    return start


def write_profile(path: Path, **values: float) -> Path:
    """A sim profile file with these keys (snake case) over the fast defaults."""
    keys = {"prefill_seconds_per_token": 0.0, "decode_seconds_per_step": 0.002,
            "decode_seconds_per_seq": 0.0, **values}
    path.write_text("".join(f"{k.replace('_', '-')}: {v}\n" for k, v in keys.items()))
    return path

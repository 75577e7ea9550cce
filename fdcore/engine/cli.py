"""``fdcore engine``: the flags (one per :class:`EngineConfig` field) and the entry point."""

from __future__ import annotations

import argparse
import enum
import sys
import types
from collections.abc import Sequence
from typing import Any, get_args

from fdcore.engine.config import SCHEDULER_PREFIX, EngineConfig, resolve
from fdcore.errors import StartupError
from fdcore.logs import configure_logging

DESCRIPTION = "Run an inference engine: OpenAI API, continuous batching, paged KV cache."
EPILOG = (
    "Scheduler plugins take their own flags, --scheduler-<field> (e.g. --scheduler-max-size, "
    "--scheduler-ttl for `local`); see docs/engine.md."
)


class EngineArgumentParser(argparse.ArgumentParser):
    """Collects ``--scheduler-<field> VALUE`` flags that no fixed option claims.

    Which fields exist depends on the scheduler plugin chosen, known only after plugins load,
    so they are gathered into ``scheduler_options`` here and validated later.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse, moving unknown ``--scheduler-*`` flags into ``namespace.scheduler_options``."""
        parsed, extras = super().parse_known_args(args, namespace)
        options: dict[str, str] = dict(getattr(parsed, "scheduler_options", {}))
        rest: list[str] = []
        items = iter(extras)
        for item in items:
            if not item.startswith("--" + SCHEDULER_PREFIX):
                rest.append(item)
                continue
            key, sep, value = item[2 + len(SCHEDULER_PREFIX):].partition("=")
            if not sep:
                # An empty value is a value (FastDeploy passes --scheduler-password "").
                following = next(items, None)
                if following is None:
                    self.error(f"{item}: expected a value")
                value = following
            options[key] = value
        parsed.scheduler_options = options
        return parsed, rest


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"choices": [member.value for member in annotation]}
    choices = [a for a in get_args(annotation) if isinstance(a, str)]
    if choices and all(isinstance(a, str) for a in get_args(annotation)):
        return {"choices": choices}
    return {}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per engine setting (unset flags stay out of the result)."""
    parser.add_argument("--config", default=None, help="engine.yaml with the same keys as flags")
    for name, field in EngineConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, types.UnionType):  # X | None
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=field.description,
            **_flag_kwargs(annotation),
        )


def add_engine_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``engine`` sub-command to an ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "engine", help=DESCRIPTION, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False
    )
    # argparse builds sub-parsers itself; this one needs the --scheduler-* collection above.
    parser.__class__ = EngineArgumentParser
    add_engine_arguments(parser)
    parser.set_defaults(func=run_engine)
    return parser


def run_engine(args: argparse.Namespace) -> int:
    """Start an engine from parsed flags; blocks until it shuts down. Raises StartupError."""
    from fdcore.engine.server import serve  # heavy imports only when an engine really starts

    flags = {k: v for k, v in vars(args).items()
             if k in EngineConfig.model_fields}
    options = _prefixed(getattr(args, "scheduler_options", {}))
    config, scheduler_options, origin = resolve(getattr(args, "config", None), flags | options)
    configure_logging(config.log_level, config.log_format)
    return serve(config, scheduler_options, origin)


def _prefixed(options: dict[str, str]) -> dict[str, str]:
    return {SCHEDULER_PREFIX + k: v for k, v in options.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fdcore.engine``."""
    parser = EngineArgumentParser(
        prog="fdcore engine", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False
    )
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_engine(args)
    except StartupError as exc:
        print(f"fdcore engine: error: {exc}", file=sys.stderr)
        return 2

"""One validator for component options: every family, whatever the values came from.

A component's options live in a namespace shared by its family (the router's flat
``scheduler:`` section for policies, ``manager.health-check-options`` for health checks, the
engine's ``--scheduler-*`` flags for schedulers). :func:`validate_options` checks the values of
one namespace against the components selected there and reports **every** problem at once, one
``source: path.to.key: message`` line each, where ``source`` is what :class:`Origin` says the
value came from (a file, an environment variable or a flag):

* a key that no registered component reads: ``unknown key`` with a "did you mean" drawn from
  the selected components' keys (and the section's own);
* a key only unselected components read: which ones, and that they are not selected;
* a value a selected component's ``Config`` refuses: pydantic's message.

:func:`check_option_keys` is the registry-time half: components of one family that declare the
same key must give it the same type (docs/plugins.md, "Options").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from fdcore.errors import StartupError

if TYPE_CHECKING:
    from fdcore.registry import Component

__all__ = [
    "Choice",
    "OptionsError",
    "Origin",
    "Validated",
    "check_option_keys",
    "error_lines",
    "kebab",
    "model_keys",
    "validate_options",
]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one value was given: ``source`` is a file, an environment variable or a flag, and
    ``path`` the key inside it (empty when the source names the key itself, as a flag does)."""

    source: str
    path: str = ""

    def line(self, message: str, *inner: str | int) -> str:
        """``source: path: message``; ``inner`` goes on for a problem inside the value."""
        path = ".".join(str(part) for part in (self.path, *inner) if part != "")
        return f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"


Locate = Callable[[str], Origin]  # a key as the user wrote it -> where it was given


class OptionsError(StartupError):
    """Bad options: ``lines`` holds one ``source: path: message`` per problem, in order."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(dict.fromkeys(lines))  # the same problem seen twice is one line
        super().__init__("\n".join(self.lines))


def kebab(key: object) -> str:
    """A key as YAML and docs write it."""
    return str(key).replace("_", "-")


def model_keys(model: type[BaseModel]) -> dict[str, str]:
    """The keys ``model`` accepts, kebab-case, each mapped to the key it validates under."""
    return {kebab(f.alias or name): f.alias or name for name, f in model.model_fields.items()}


def error_lines(exc: ValidationError, locate: Locate, depth: int = 1) -> list[str]:
    """One line per pydantic error; ``locate`` gets the error's first ``depth`` keys, dotted
    (``depth=2`` for a whole file of sections: ``server.port``)."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(part) for part in loc[:depth])
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(locate(key).line(message, *loc[depth:]))
    return lines


@dataclass(frozen=True)
class Choice:
    """One family's option namespace: what is selected there and how errors talk about it.

    ``selected`` may name one component twice (one per role); ``registered`` is every component
    of the family. ``chosen_by`` shows the selection (``scheduler.policy: round_robin``).
    ``noun`` is what a key is called (``key`` in files, ``option`` for flags); ``spell`` writes
    a key as the user would, for suggestions. ``section_keys`` are the section's own keys
    (suggested, never an option). A ``tolerated`` key that no selected component reads is
    ignored with a warning instead of refused (FastDeploy writes its keys whatever it selects).
    """

    label: str
    selected: Sequence[Component]
    registered: Sequence[Component]
    chosen_by: str
    noun: str = "key"
    spell: Callable[[str], str] = repr
    section_keys: Collection[str] = ()
    tolerated: Collection[str] = ()


@dataclass(frozen=True)
class Validated:
    """Each selected component's config, by name, and a warning line per ignored key."""

    configs: dict[str, BaseModel]
    ignored: list[str]


def validate_options(choice: Choice, values: Mapping[str, Any], locate: Locate) -> Validated:
    """Give each selected component the values its ``Config`` declares and validate them.

    Raises :class:`OptionsError` listing every problem: unknown keys, keys only unselected
    components read, values a selected component refuses.
    """
    selected = list({c.name: c for c in choice.selected}.values())
    keys = {c.name: model_keys(c.cls.Config) for c in selected}
    readers: dict[str, list[str]] = {}
    for component in choice.registered:
        for key in model_keys(component.cls.Config):
            readers.setdefault(key, []).append(component.name)
    given: dict[str, dict[str, Any]] = {c.name: {} for c in selected}
    as_written: dict[str, str] = {}  # kebab-case key -> the key as the user wrote it
    lines: list[str] = []
    ignored: list[str] = []
    for key, value in values.items():
        wanted = kebab(key)
        as_written[wanted] = key
        takers = [c.name for c in selected if wanted in keys[c.name]]
        for name in takers:
            given[name][keys[name][wanted]] = value
        if takers:
            continue
        if wanted in readers:
            message = _not_selected(choice, readers[wanted])
        else:
            message = _unknown(choice, wanted, keys)
        if wanted in choice.tolerated:
            ignored.append(locate(key).line(f"{message}; ignored"))
        else:
            lines.append(locate(key).line(message))

    def at(key: str) -> Origin:
        return locate(as_written.get(kebab(key), kebab(key)))

    configs: dict[str, BaseModel] = {}
    for component in selected:
        try:
            configs[component.name] = component.cls.Config.model_validate(given[component.name])
        except ValidationError as exc:
            lines += error_lines(exc, at)
    if lines:
        raise OptionsError(lines)
    return Validated(configs, ignored)


def _names(label: str, names: Sequence[str]) -> str:
    quoted = [repr(n) for n in dict.fromkeys(names)]
    if len(quoted) == 1:
        return f"{label} {quoted[0]}"
    plural = label[:-1] + "ies" if label.endswith("y") else label + "s"
    return f"{plural} {', '.join(quoted[:-1])} and {quoted[-1]}"


def _not_selected(choice: Choice, readers: Sequence[str]) -> str:
    verb = "is" if len(readers) == 1 else "are"
    return (f"read only by {_names(choice.label, readers)}, which {verb} not selected "
            f"({choice.chosen_by})")


def _unknown(choice: Choice, key: str, keys: Mapping[str, Mapping[str, str]]) -> str:
    mine = sorted({k for taken in keys.values() for k in taken})
    what = f"unknown {choice.noun} of {_names(choice.label, list(keys))}"
    close = difflib.get_close_matches(key, [*mine, *choice.section_keys], n=1)
    if close:
        return f"{what} (did you mean {choice.spell(close[0])}?)"
    they = "it takes" if len(keys) == 1 else "they take"
    takes = ", ".join(choice.spell(k) for k in mine) or "no options"
    return f"{what} ({they} {takes})"


def check_option_keys(
    components: Iterable[Component], reserved: Mapping[str, Collection[str]] | None = None
) -> None:
    """Refuse option keys two components of one family declare with different types, and keys
    that are the family's own section keys (``reserved``, by family), naming the components.

    Raises :class:`StartupError` with one line per clash.
    """
    declared: dict[tuple[str, str], list[tuple[Component, Any]]] = {}
    lines = []
    for component in components:
        own = (reserved or {}).get(component.family, ())
        for name, info in component.cls.Config.model_fields.items():
            key = kebab(info.alias or name)
            if key in own:
                lines.append(f"{_who(component)} declares option {key!r}, which is the "
                             f"section's own key; prefix it with {component.name!r}")
            declared.setdefault((component.family, key), []).append((component, info.annotation))
    for (_, key), owners in declared.items():
        first, first_type = owners[0]
        for other, other_type in owners[1:]:
            if other_type != first_type:
                lines.append(
                    f"option {key!r} is {_type_name(first_type)} for {_who(first)} but "
                    f"{_type_name(other_type)} for {_who(other)}: one value cannot serve both; "
                    f"prefix a component's own options with its name (docs/plugins.md, Options)"
                )
    if lines:
        raise StartupError("\n".join(lines))


def _who(component: Component) -> str:
    return (f"{component.family.replace('_', ' ')} {component.name!r} "
            f"(plugin {component.plugin!r})")


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")

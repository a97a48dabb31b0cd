"""The config's schema, generated from the field metadata of :mod:`splade_obs.config`: one
:class:`FieldSpec` per key (type, default, help, flag, choices, bounds), the typed check every value goes
through (pydantic, lax numbers, errors naming key, source and expected type) and the ``docs/config.md`` page.

The CLI options (``cli/options.py``), the docs and the validation read the keys from here; the keys
themselves are written once, as the dataclasses in :mod:`splade_obs.config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from .errors import EXIT_CODES, ConfigError, ErrorCategory

#: The source name of values given as command-line flags (errors say ``command line: optim.batch_size: ...``).
COMMAND_LINE = "command line"
#: The source name of values given in code; errors then name no file.
IN_CODE = "config"

# ------------------------------------------------------------------------------------------------ field specs
@dataclass(frozen=True)
class FieldSpec:
    """One config key as the CLI, the docs and the validation see it."""

    section: str
    name: str
    type: Any                       # the resolved annotation (int, float | None, tuple[str, ...], ...)
    default: Any
    help: str
    flag: str | None                # "--learning-rate"; None: config-file only
    choices: tuple[str, ...] | None
    case_insensitive: bool
    bare: str | None
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None
    metavar: str | None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def param(self) -> str | None:
        """The click parameter name of the flag (``--require-tracking`` -> ``require_tracking``)."""
        return self.flag[2:].replace("-", "_") if self.flag else None

    @property
    def optional(self) -> bool:
        return type(None) in _union_args(self.type)

    @property
    def base(self) -> Any:
        """The type without ``| None``."""
        args = [a for a in _union_args(self.type) if a is not type(None)]
        return args[0] if len(args) == 1 else self.type

    @property
    def repeatable(self) -> bool:
        return typing.get_origin(self.base) is tuple

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def expected(self) -> str:
        """What the value must be, in words: ``float``, ``int | null``, ``one of auto, no, fp16, bf16``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return self.type_name


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def type_name(tp: Any) -> str:
    """``int``, ``float | null``, ``list[str]``: the type as a config file writer reads it."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = sorted(typing.get_args(tp), key=lambda a: a is type(None))
        return " | ".join(type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


_SPECS: tuple[FieldSpec, ...] | None = None


def config_fields() -> tuple[FieldSpec, ...]:
    """Every config key, section by section, in declaration order."""
    global _SPECS
    if _SPECS is None:
        specs = []
        from .config import TrainConfig

        for sect in dataclasses.fields(TrainConfig):
            cls = sect.default_factory  # type: ignore[misc]
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                m = f.metadata
                flag = None if m.get("file_only") else "--" + (m.get("flag") or f.name.replace("_", "-"))
                specs.append(FieldSpec(section=sect.name, name=f.name, type=hints[f.name], default=f.default,
                                       help=m.get("help", ""), flag=flag, choices=m.get("choices"),
                                       case_insensitive=bool(m.get("case_insensitive")), bare=m.get("bare"),
                                       ge=m.get("ge"), gt=m.get("gt"), le=m.get("le"), lt=m.get("lt"),
                                       metavar=m.get("metavar")))
        flags = [s.flag for s in specs if s.flag]
        dup = {f for f in flags if flags.count(f) > 1}
        if dup:  # pragma: no cover - a programming error caught by the tests
            raise RuntimeError(f"config flags used twice: {sorted(dup)}")
        _SPECS = tuple(specs)
    return _SPECS


def field_spec(key: str) -> FieldSpec:
    """The spec of a dotted key (``optim.batch_size``); KeyError when unknown."""
    for spec in config_fields():
        if spec.key == key:
            return spec
    raise KeyError(key)


def section_names() -> list[str]:
    from .config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def _section_class(name: str) -> type:
    from .config import TrainConfig

    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}[name]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ typed checks
def _describe(value: Any) -> str:
    """``str 'x'``, ``null``, ``list [1, 2]``: the offending value, short."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {list: "list", tuple: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    return f"{kind} {text}"


def _reject_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _int_input(value: Any) -> Any:
    """Integers written as text (``"8"``, YAML's ``1e3``) become ints; ``8.5`` and ``"x"`` stay errors."""
    _reject_bool(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                return value
            return int(f) if math.isfinite(f) and f.is_integer() else value
    return value


def _float_input(value: Any) -> Any:
    _reject_bool(value)
    return value.strip() if isinstance(value, str) else value


def _str_input(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _pydantic_type(tp: Any) -> Any:
    from typing import Annotated

    from pydantic import BeforeValidator, Field

    if tp is int:
        return Annotated[int, BeforeValidator(_int_input)]
    if tp is float:
        return Annotated[float, BeforeValidator(_float_input), Field(allow_inf_nan=False)]
    if tp is str:
        return Annotated[str, BeforeValidator(_str_input)]
    if tp is bool or tp is type(None):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        return Union[tuple(_pydantic_type(a) for a in typing.get_args(tp))]  # type: ignore[return-value]
    if typing.get_origin(tp) is tuple:
        return tuple[_pydantic_type(typing.get_args(tp)[0]), ...]  # type: ignore[misc]
    raise TypeError(f"no validation for config type {tp!r}")  # pragma: no cover


_ADAPTERS: dict[str, Any] = {}


def _adapter(spec: FieldSpec) -> Any:
    if spec.key not in _ADAPTERS:
        from pydantic import TypeAdapter

        _ADAPTERS[spec.key] = TypeAdapter(_pydantic_type(spec.type))
    return _ADAPTERS[spec.key]


def _config_error(key: str, message: str, source: str | None, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{key}: {message}", file_path=None if source in (None, IN_CODE) else source,
                       field=key, hint=hint)


def _example(spec: FieldSpec) -> str:
    if spec.default is not None and spec.default != ():
        return f"e.g. {_render_default(spec.default)} (the default)"
    if spec.repeatable:
        return 'e.g. ["a", "b"]'
    return {"int": "e.g. 100", "float": "e.g. 0.5", "str": 'e.g. "text"'}.get(type_name(spec.base), "")


def _type_hint(spec: FieldSpec) -> str:
    parts = [f"{spec.key} takes {spec.expected}"]
    example = _example(spec) if not spec.choices else ""
    if example:
        parts[0] += f", {example}"
    if spec.optional:
        parts.append("null (or leaving the key out in TOML) keeps the default")
    parts.append(f"flag {spec.flag}" if spec.flag else "config file only")
    return "; ".join(parts)


def check_value(spec: FieldSpec, value: Any, source: str | None = IN_CODE) -> Any:
    """``value`` converted to the key's type and checked against its choices and bounds; ConfigError if not."""
    from pydantic import ValidationError

    flag = f" ({spec.flag})" if source == COMMAND_LINE and spec.flag else ""
    try:
        out = _adapter(spec).validate_python(value)
    except ValidationError as exc:
        where = ""
        loc = exc.errors()[0].get("loc") if exc.errors() else None
        if loc and isinstance(loc[0], int) and isinstance(value, (list, tuple)):
            where = f" (item {loc[0]}: {_describe(value[loc[0]])})"
        finite = "a finite " if _non_finite(value) else ""
        raise _config_error(spec.key, f"expected {finite}{spec.type_name}{flag}, got {_describe(value)}{where}",
                            source, _type_hint(spec)) from None
    if spec.choices and out is not None:
        items = out if isinstance(out, tuple) else (out,)   # a repeatable key checks each of its values
        if spec.case_insensitive:
            items = tuple(next((c for c in spec.choices if c.lower() == v.lower()), v) if isinstance(v, str) else v
                          for v in items)
        for item in items:
            if item not in spec.choices:
                raise _config_error(spec.key, f"must be one of {', '.join(spec.choices)}, got {item!r}{flag}",
                                    source, _type_hint(spec))
        out = items if isinstance(out, tuple) else items[0]
    if out is not None and isinstance(out, (int, float)) and not isinstance(out, bool):
        for bound, words in _bounds(spec):
            if not _BOUND_OK[words](out, bound):
                extra = f" (within {_interval(spec)})" if _interval(spec) else ""
                raise _config_error(spec.key, f"must be {words} {_num(bound)}{extra}, got {out!r}{flag}", source,
                                    _type_hint(spec))
    return out


_BOUND_OK = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b,
             "<": lambda v, b: v < b}


def _bounds(spec: FieldSpec) -> list[tuple[float, str]]:
    """The key's numeric bounds as ``(bound, ">=")`` pairs, lower bounds first."""
    return [(b, w) for b, w in ((spec.ge, ">="), (spec.gt, ">"), (spec.le, "<="), (spec.lt, "<")) if b is not None]


def _interval(spec: FieldSpec) -> str | None:
    """``[0, 1)`` when the key has a lower and an upper bound, else None."""
    lo = ("[", spec.ge) if spec.ge is not None else ("(", spec.gt) if spec.gt is not None else None
    hi = ("]", spec.le) if spec.le is not None else (")", spec.lt) if spec.lt is not None else None
    if lo is None or hi is None:
        return None
    return f"{lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"


def _non_finite(value: Any) -> bool:
    """inf/nan, also written as text (``.inf`` in YAML, ``nan`` on the command line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ------------------------------------------------------------------------------------------------ docs
def _render_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


def _md(text: str) -> str:
    """Text safe in a Markdown table cell (``|`` splits cells, ``<log-dir>`` would read as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "\\<").replace(">", "\\>")


def _flag_doc(spec: FieldSpec) -> str:
    if spec.flag is None:
        return "(file only)"
    if spec.base is bool:
        return f"`{spec.flag}` / `--no-{spec.flag[2:]}`"
    if spec.repeatable:
        return f"`{spec.flag} {spec.metavar or 'VALUE'}` (repeatable)"
    if spec.bare:
        return f"`{spec.flag} [VALUE]` (bare: `{spec.bare}`)"
    return f"`{spec.flag}`"


def render_config_docs() -> str:
    """``docs/config.md``: every section and key with its type, default, flag and help (written by
    ``scripts/gen_docs.py``; a test keeps the file equal to this)."""
    lines = [
        "<!-- Generated from splade_obs/config.py by `python scripts/gen_docs.py`: do not edit by hand. -->",
        "",
        "# Configuration reference",
        "",
        "Every setting of `splade-obs train` is one key of one section below. The keys, their types, defaults,",
        "flags and help texts are written once, in the dataclasses of `splade_obs/config.py`; the `train`",
        "options, this page and the validation are generated from them.",
        "",
        "Values combine in this order, later winning key by key: the defaults below, the `--config` file",
        "(YAML `.yaml`/`.yml`, TOML `.toml` or JSON `.json`, sections as tables or dotted keys such as",
        "`optim.batch_size`), then the flags given on the command line (a flag not given leaves the file's",
        "value alone). Every value is checked against its type, choices and bounds: numbers written as text",
        "(YAML reads `5e-5` as a string) are converted, anything else that does not fit, and any unknown section",
        "or key, stops the run before it starts with `error[CONFIG_ERROR]` naming the key, the file (or",
        f"`command line`) and the expected type (exit code {EXIT_CODES[ErrorCategory.CONFIG_ERROR]}).",
        "",
        "```yaml",
        "# run.yaml: splade-obs train --config run.yaml --learning-rate 1e-4",
        "model:",
        "  max_query_length: 32",
        "optim:",
        "  batch_size: 16",
        "  learning_rate: 5e-5",
        "recovery:",
        "  inject_faults: []",
        "tracking:",
        "  enabled: false",
        "```",
        "",
        "`splade-obs config show [--config FILE] [flags] [--format yaml|json|params]` prints the effective",
        "configuration (`--format params`: exactly the MLflow params a run logs). Optional keys (`| null`) take",
        "`null` in YAML/JSON; in TOML leave them out. `list[str]` keys take a list; their flag is repeated.",
        "Besides the flags below, `train` takes `--config FILE` and `--debug` (full tracebacks).",
        "",
    ]
    by_section: dict[str, list[FieldSpec]] = {}
    for spec in config_fields():
        by_section.setdefault(spec.section, []).append(spec)
    for sect, specs in by_section.items():
        doc = (_section_class(sect).__doc__ or "").strip().splitlines()[0]
        lines += [f"## `{sect}`", "", doc, "", "| Key | Type | Default | Flag | Description |",
                  "|---|---|---|---|---|"]
        for spec in specs:
            help_text = spec.help
            if spec.choices:
                help_text += " One of: " + ", ".join(f"`{c}`" for c in spec.choices) + "."
            if spec.case_insensitive:
                help_text += " Case-insensitive."
            bounds = [f"{w} {_num(b)}" for b, w in _bounds(spec)]
            if bounds:
                help_text += " Must be " + " and ".join(bounds) + "."
            lines.append(f"| `{spec.key}` | `{_md(spec.type_name)}` | `{_md(_render_default(spec.default))}` | "
                         f"{_flag_doc(spec)} | {_md(help_text)} |")
        lines.append("")
    return "\n".join(lines)

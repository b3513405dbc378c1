"""Every config field's one declaration: its type (the annotation), its range, and what a resume may do.

    @dataclass
    class OptimConfig:
        lr: float = setting(3e-3, gt=0)                          # floats are always finite
        betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)  # bounds hold for each element
        log_every: int = setting(10, ge=1, resume="any")          # a resume may change it

Three functions read those declarations, so no field is checked by hand anywhere:

- `assign(root, "optim.lr", value)`: a value from a config file or `--set` (text or
  JSON), converted to the declared type and checked against the declared range;
- `check_tree(cfg, "optim")`: every field of a dataclass tree, however it was built
  (presets, `from_dict`, a library user's constructor); values are normalised in place
  (an int where a float belongs becomes a float, a list where a tuple belongs a tuple);
- `changed_settings(saved, cfg)`: the fields a run's saved config and `cfg` disagree on.

Types understood: bool, int, float, str, `Literal[...]`, `list[T]`, `tuple[T, ...]`,
`tuple[T1, T2]`, `T1 | T2` (such as `int | list[int]`) and nested dataclasses.
Decisions: an int field takes 3 and 3.0 (a JSON file may write either) but not 3.5
or true; a float field takes any finite number, never NaN or an infinity; a bool takes
true/false, yes/no, 1/0. Text for a list is JSON (`[4, 8]`) or comma-separated (`4,8`).
Standard library only (and `sdmoe.errors`): configs load without importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from sdmoe.errors import UserError

Resume = Literal["same", "any", "grow"]
MAX_SEED = 2**32 - 1  # numpy's and every seeded generator's range: a seed anywhere is 0..MAX_SEED
_META = "sdmoe"
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type, and whether a resume may change it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int = 0  # lists: at least this many entries
    unique: bool = False  # lists: no entry twice
    note: str = ""  # what special values mean, shown in messages: "0 = off"
    label: str = ""  # the field's name in "unknown <label> 'x'" (default: the field name)
    # "same": a resume must keep it; "any": it cannot change the numbers, a resume may change it;
    # "grow": a resume may raise it, never lower it (loop.steps: extend a run).
    resume: Resume = "same"


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, min_len: int = 0, unique: bool = False, note: str = "", label: str = "",
            resume: Resume = "same") -> Any:
    """A dataclass field with its rule; a mutable default (a list) is copied for every instance."""
    meta = {_META: Rule(ge, gt, le, lt, min_len, unique, note, label, resume)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=functools.partial(type(default), default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get(_META, Rule())


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# -- showing values in one line -------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxlevel = 60, 60, 8, 3


def show(value: Any) -> str:
    """A value as a user would type it after `key=` (bounded: a huge or deeply nested one is cut)."""
    if isinstance(value, str):
        return _repr.repr(value)[1:-1] if len(value) > 60 else value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return _repr.repr(list(value))
    return _repr.repr(value)


def _got(value: Any) -> str:
    return _repr.repr(value)


def _choices(options: tuple) -> str:
    words = [str(o) for o in options]
    if len(words) == 1:
        return words[0]
    if len(words) == 2:
        return f"{words[0]} or {words[1]}"
    return f"one of {', '.join(words)}"


# -- conversion to the declared type ---------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_sequence_type(tp: Any) -> bool:
    return get_origin(tp) in (list, tuple)


def _takes_text(tp: Any) -> bool:
    """Whether a string is a value of `tp` itself (not text to parse)."""
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return _is_union(tp) and any(_takes_text(a) for a in get_args(tp))


def _describe(tp: Any) -> str:
    """"an integer", "a list of integers", "2 numbers", ... for messages."""
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return _choices(args)
    if _is_union(tp):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return f"{len(args)} {_plural(_describe(args[0]))}"
    if origin in (list, tuple):
        if get_origin(args[0]) is Literal:
            return f"a list drawn from {', '.join(map(str, get_args(args[0])))}"
        return f"a list of {_plural(_describe(args[0]))}"
    return getattr(tp, "__name__", str(tp))


def _plural(what: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if what == one:
            return many
    return what


def _parse_number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text  # left for the type's own message ("takes a number, got 'fast'")


def _parse_json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{key} nests too deeply to be a config value; give a flat list such as [4, 8]") from None
    except ValueError:  # not JSON (also: an integer with more digits than Python converts)
        return None


def _text_to_list(text: str, key: str) -> list:
    """`[4, 8]` (JSON) or `4,8` (comma-separated; empty entries dropped)."""
    if text.strip().startswith("["):
        value = _parse_json(text, key)
        if isinstance(value, list):
            return value
        raise UserError(f"{key} takes a JSON list or comma-separated values, got {_got(text)}")
    return [v.strip() for v in text.split(",") if v.strip()]


def coerce(value: Any, tp: Any, key: str, label: str = "", parse: bool = True, rule: Rule | None = None) -> Any:
    """`value` as a value of type `tp`, or a one-line UserError naming `key`.

    `parse`: a string may be text for a non-string type ("3", "true", "4,8"): values from
    `--set` and config files. Without it (checking a built config) a string is a string.
    `rule`: the field's range, named when a number is not finite."""
    label = label or key.rsplit(".", 1)[-1]
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        if isinstance(value, str) and parse and not _takes_text(tp):
            text = value.strip()
            value = _text_to_list(text, key) if text.startswith("[") or "," in text else _parse_number(text)
        seq = [a for a in args if _is_sequence_type(a)]
        scalar = [a for a in args if not _is_sequence_type(a)]
        if isinstance(value, (list, tuple)) and seq:
            return coerce(value, seq[0], key, label, parse, rule)
        if scalar and not isinstance(value, (list, tuple)):
            try:
                return coerce(value, scalar[0], key, label, parse, rule)
            except UserError:
                if len(scalar) == 1:
                    raise UserError(f"{key} takes {_describe(tp)}, got {_got(value)}") from None
                raise
        raise UserError(f"{key} takes {_describe(tp)}, got {_got(value)}")
    if origin is Literal:
        if value not in args or type(value) is not type(args[0]):  # 1 == True: the type must match too
            raise UserError(f"unknown {label} {_got(value)}; {key} must be {_choices(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and parse:
            value = _text_to_list(value, key)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} takes {_describe(tp)}, got {_got(value)}")
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise UserError(f"{key} takes {_describe(tp)}, got {len(value)}: {_got(value)}")
        items = args if fixed else (args[0],) * len(value)
        out = [coerce(v, t, f"{key}[{i}]", f"{label} entry", parse, rule) for i, (v, t) in enumerate(zip(value, items))]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, str) and parse and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        if not isinstance(value, bool):
            raise UserError(f"{key} takes true or false, got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, str) and parse:
            value = _parse_number(value.strip())
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} takes an integer, got {_got(value)}")
        return value
    if tp is float:
        given = value
        if isinstance(value, str) and parse:
            value = _parse_number(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} takes a number, got {_got(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            where = _bounds(rule) if rule else ""
            raise UserError(f"{key}={show(given)} is not a finite number; use a number {where or 'that is finite'}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key} takes a string, got {_got(value)}")
        return value
    raise TypeError(f"config field {key}: type {tp!r} is not supported by sdmoe.config_fields")


# -- ranges -----------------------------------------------------------------------------------------


def _bounds(rule: Rule) -> str:
    lo = (f"[{_num(rule.ge)}" if rule.ge is not None else f"({_num(rule.gt)}" if rule.gt is not None else None)
    hi = (f"{_num(rule.le)}]" if rule.le is not None else f"{_num(rule.lt)})" if rule.lt is not None else None)
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    if hi:
        return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _in_range(x: float, rule: Rule) -> bool:
    return ((rule.ge is None or x >= rule.ge) and (rule.gt is None or x > rule.gt)
            and (rule.le is None or x <= rule.le) and (rule.lt is None or x < rule.lt))


def _scalar_kind(tp: Any) -> str:
    """"an integer" / "a number" of a field or of its entries."""
    if tp in (int, float):
        return _describe(tp)
    args = [a for a in get_args(tp) if a is not Ellipsis]
    return _scalar_kind(args[0]) if args else "a value"


def check_range(value: Any, tp: Any, rule: Rule, key: str) -> None:
    """`value` (already of type `tp`) against the field's bounds, length and uniqueness."""
    if isinstance(value, (list, tuple)):
        if len(value) < rule.min_len:
            raise UserError(f"{key} needs at least {rule.min_len} "
                            f"{'entry' if rule.min_len == 1 else 'entries'}, got {show(value)}")
        if rule.unique:
            seen = set()
            for v in value:
                if v in seen:
                    raise UserError(f"{key} lists {show(v)} twice: {show(value)}; list each at most once")
                seen.add(v)
        items = list(value)
    else:
        items = [value]
    where = _bounds(rule)
    if not where:
        return
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not _in_range(v, rule):
            note = f" ({rule.note})" if rule.note else ""
            raise UserError(f"{key}={show(value)} is out of range; use {_scalar_kind(tp)} {where}{note}")


# -- the dataclass tree -------------------------------------------------------------------------------


def check_tree(obj: Any, prefix: str = "", skip: tuple[str, ...] = (), flags: bool = False) -> None:
    """Check every field of dataclass `obj` (and its sections) against its declaration; normalise in place.

    `prefix` names `obj` in messages ("optim" -> "optim.lr"); `skip` lists field names to leave alone;
    `flags`: the fields are a command's options, named as the user typed them (`drop_ratio` -> `--drop-ratio`)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        key = f"--{f.name.replace('_', '-')}" if flags else f"{prefix}.{f.name}" if prefix else f.name
        tp, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise UserError(f"{key} must be a {tp.__name__} section, got {_got(value)}")
            check_tree(value, key)
            continue
        rule = rule_of(f)
        value = coerce(value, tp, key, rule.label, parse=False, rule=rule)
        check_range(value, tp, rule, key)
        setattr(obj, f.name, value)


def _unknown_key(key: str, part: str, where: str, names: list[str]) -> UserError:
    close = difflib.get_close_matches(part, names, n=1)
    hint = f"; did you mean {where + '.' if where != 'the top level' else ''}{close[0]}?" if close else ""
    return UserError(f"unknown config key {key!r}: {where} has {', '.join(names)}{hint}")


def assign(root: Any, key: str, value: Any) -> None:
    """Set dotted `key` of the dataclass tree `root` from a config file or `--set` value.

    The value is converted to the field's declared type and checked against its range; a
    dict given for a section sets the section's keys one by one."""
    node: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = _fields(type(node))
        if part not in fields:
            raise _unknown_key(key, part, ".".join(parts[:i]) or "the top level", list(fields))
        tp = _hints(type(node))[part]
        here = ".".join(parts[: i + 1])
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"unknown config key {key!r}: {here} is a value, not a section")
            node = getattr(node, part)
            continue
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                section = getattr(node, part)
                names = list(_fields(tp))
                example = f"{here}.{names[0]}={show(getattr(section, names[0]))}"
                raise UserError(f"{here} is a section, not a value: set one of its keys "
                                f"({', '.join(names)}), e.g. {example}")
            for k, v in value.items():
                assign(root, f"{here}.{k}", v)
            return
        rule = rule_of(fields[part])
        converted = coerce(value, tp, here, rule.label, rule=rule)
        check_range(converted, tp, rule, here)
        setattr(node, part, converted)


def parse_value(cls: type, key: str, value: Any) -> Any:
    """What `assign` would store at dotted `key` of a default `cls()` tree (checked the same way)."""
    node = cls()
    assign(node, key, value)
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


_MISSING = object()


def changed_settings(saved: Any, obj: Any, prefix: str = "") -> list[tuple[str, Rule, Any, Any]]:
    """`(key, rule, saved value, value in obj)` for every leaf where `obj` differs from `saved`.

    `saved` is the `dataclasses.asdict` form as stored in JSON; a key it lacks (written before
    the field existed) counts as the field's default."""
    out = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        new = getattr(obj, f.name)
        old = saved.get(f.name, _MISSING) if isinstance(saved, dict) else _MISSING
        if dataclasses.is_dataclass(new):
            out += changed_settings(old if isinstance(old, dict) else {}, new, key)
            continue
        if old is _MISSING:
            old = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if _plain(new) != _plain(old):
            out.append((key, rule_of(f), old, new))
    return out

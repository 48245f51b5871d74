"""What `vllm serve` (vLLM 0.32) makes of a command line, without importing vLLM.

The PD checks must see the value vLLM will use, whatever the spelling: vLLM's
FlexibleArgumentParser first rewrites the arguments — dashes and underscores are the same in a
flag's name, `-O3` is `--optimization-level 3`, and dotted sub-keys (`--hf-overrides.a 1`,
`--x.key+ a,b`) are gathered into one JSON object per flag that is appended at the END of the
line (so it replaces, not merges with, an earlier `--hf-overrides '{...}'`) — and then argparse
resolves options: exact names, `--flag=value`, unambiguous prefixes (`--block-si 32` is
`--block-size 32`), `-tp=2`, negative numbers as values, the last occurrence winning. This module
repeats both steps over the option table of vLLM 0.32 (vllm_flags.py, generated from vLLM's own
parser), and tests/operator/test_operator_vllm_args.py runs vLLM's real parser over a generated
corpus of spellings to check that the two agree on every one.

Values stay strings (vLLM's type conversion is not repeated): the operator compares them between
pools and reads a few integers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from .vllm_flags import OPTIONS

_NAME = re.compile(r"(?<=--)[^\.]*")          # FlexibleArgumentParser: between the first -- and .
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_HUMAN_INT = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]i?)$", re.IGNORECASE)
_UNSEEN = -1   # index of arguments the caller did not write (the operator's own)


@dataclasses.dataclass
class Parsed:
    """The outcome: each dest's effective value (str, list of str, bool or a JSON text for
    dotted flags) and the index in `extra` of the argument that set it last (`_UNSEEN` for the
    operator's own), and the first error vLLM would exit with, as (index, message)."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: dict[str, int] = dataclasses.field(default_factory=dict)
    # dest -> indices in `extra` of every option naming it (also one left without its value)
    set_by: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    error: tuple[int, str] | None = None

    def _set(self, dest: str, value: Any, index: int, append: bool = False) -> None:
        if append:
            value = [*self.values.get(dest, []), value]
        self.values[dest] = value
        self.origin[dest] = index


def _human_int(text: str) -> int:
    """vLLM's human_readable_int for dotted values that are not JSON (`80g`, `1k`)."""
    match = _HUMAN_INT.match(text)
    if not match:
        raise ValueError(text)
    number, suffix = match.groups()
    if "." in number and suffix.lower().endswith("i"):
        raise ValueError(text)   # vLLM: decimals only with decimal suffixes
    return int(float(number) * _SUFFIX[suffix.lower()])


def _dotted_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        try:
            return _human_int(text)
        except ValueError:
            return text


def _merge(original: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(original.get(key), dict):
            _merge(original[key], value)
        elif isinstance(value, list) and isinstance(original.get(key), list):
            original[key] += value
        else:
            original[key] = value


def rewrite(args: Sequence[str], origins: Sequence[int]) -> tuple[list[str], list[int]]:
    """FlexibleArgumentParser's rewriting, keeping for each argument the index it came from."""
    out: list[str] = []
    where: list[int] = []
    for i, (arg, origin) in enumerate(zip(args, origins, strict=True)):
        pieces = [arg]
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            pieces = [_NAME.sub(lambda m: m.group(0).replace("_", "-"), key, count=1) + eq + value]
        elif arg.startswith("-O") and arg != "-O":   # -O3, -O=3
            pieces = ["--optimization-level", arg[3:] if arg[2] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(args) and args[i + 1] in {"0", "1", "2", "3"}:
            pieces = ["--optimization-level"]
        out += pieces
        where += [origin] * len(pieces)
    dicts: dict[str, dict[str, Any]] = {}
    first: dict[str, int] = {}
    skip: set[int] = set()
    for i, arg in enumerate(out):
        if i in skip or (arg.startswith("--") and "." not in arg) or not (arg.startswith("-") and "." in arg):
            continue
        if "=" in arg:
            name, value = arg.split("=", 1)
            if "." not in name:
                continue   # the dot was in the value
        else:
            if i + 1 >= len(out):   # vLLM fails with an IndexError
                raise IndexError(f"{arg} has no value")
            name, value = arg, out[i + 1]
            skip.add(i + 1)
        if name.endswith("+"):
            name, value = name[:-1], json.dumps(value.split(","))
        key, *keys = name.split(".")
        nested: Any = _dotted_value(value)
        for part in reversed(keys):
            nested = {part: nested}
        _merge(dicts.setdefault(key, {}), nested)
        first.setdefault(key, where[i])
        skip.add(i)
    kept = [(a, w) for i, (a, w) in enumerate(zip(out, where, strict=True)) if i not in skip]
    for key, merged in dicts.items():
        kept += [(key, first[key]), (json.dumps(merged), first[key])]
    return [a for a, _ in kept], [w for _, w in kept]


def _option(arg: str) -> tuple[str, str | None] | None:
    """argparse's `_parse_optional` over vLLM's table: (option string, explicit value), None for
    a positional; raises ValueError for an unknown or ambiguous option."""
    if not arg or arg[0] != "-":
        return None
    if arg == "--":
        raise ValueError("-- ends vLLM's options; what follows would be positional arguments")
    if arg in OPTIONS:
        return arg, None
    if len(arg) == 1:
        return None
    if "=" in arg and arg.split("=", 1)[0] in OPTIONS:
        name, value = arg.split("=", 1)
        return name, value
    if arg[1] == "-":
        prefix, eq, value = arg.partition("=")
        matches = [(o, value if eq else None) for o in OPTIONS if o.startswith(prefix)]
    else:
        matches = [(o, arg[2:]) if o == arg[:2] else (o, None) for o in OPTIONS if o == arg[:2] or o.startswith(arg)]
    if len(matches) > 1:
        raise ValueError(f"ambiguous option: {arg} could match {', '.join(o for o, _ in matches)}")
    if matches:
        return matches[0]
    if _NEGATIVE_NUMBER.match(arg) or " " in arg:
        return None
    raise ValueError(f"unrecognized argument {arg} (not a `vllm serve` option in vLLM 0.32)")


def parse(base: Sequence[str], extra: Sequence[str]) -> Parsed:
    """`vllm serve BASE... EXTRA...` -> the effective values; indices refer to `extra`. `base`
    is the operator's own part (model positional first)."""
    parsed = Parsed()
    try:
        args, where = rewrite([*base, *extra], [_UNSEEN] * len(base) + list(range(len(extra))))
    except IndexError as exc:
        parsed.error = (len(extra) - 1, str(exc))
        return parsed
    try:
        kinds = [_option(a) for a in args]
    except ValueError as exc:
        index = next((where[i] for i, a in enumerate(args) if _raises(a)), len(extra) - 1)
        parsed.error = (index, str(exc))
        return parsed
    model_seen = False
    i = 0
    while i < len(args):
        found = kinds[i]
        if found is None:
            if model_seen:
                parsed.error = (where[i], f"unrecognized argument {args[i]!r} (a value without a flag)")
                return parsed
            model_seen = True
            parsed._set("model_tag", args[i], where[i])
            i += 1
            continue
        option, explicit = found
        dest, kind = OPTIONS[option]
        if where[i] != _UNSEEN and where[i] not in parsed.set_by.get(dest, []):
            parsed.set_by.setdefault(dest, []).append(where[i])
        following = []
        j = i + 1
        while j < len(args) and kinds[j] is None:
            following.append(args[j])
            j += 1
        consumed = 0
        if kind == "help":
            parsed.error = (where[i], f"{option} prints help and exits")
            return parsed
        if kind in ("true", "false"):
            if explicit is not None:
                parsed.error = (where[i], f"{option} takes no value (got {explicit!r})")
                return parsed
            parsed._set(dest, kind == "true", where[i])
        elif explicit is not None:
            parsed._set(dest, [explicit] if kind == "list" else explicit, where[i], append=kind == "append")
        elif kind in ("value", "append"):
            if not following:
                parsed.error = (where[i], f"{option} expects a value")
                return parsed
            parsed._set(dest, following[0], where[i], append=kind == "append")
            consumed = 1
        elif kind == "list":
            if not following:
                parsed.error = (where[i], f"{option} expects at least one value")
                return parsed
            parsed._set(dest, following, where[i])
            consumed = len(following)
        else:  # optional: zero or one value
            parsed._set(dest, following[0] if following else True, where[i])
            consumed = min(1, len(following))
        i += 1 + consumed
    return parsed


def _raises(arg: str) -> bool:
    try:
        _option(arg)
    except ValueError:
        return True
    return False

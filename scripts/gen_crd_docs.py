#!/usr/bin/env python3
"""Generate docs/configuration.md, the UCMCluster field reference, from the CRD's OpenAPI schema.

The CRD in crds/ is what the API server validates against, so the reference is written from it
rather than by hand: types, defaults, enums, bounds, patterns, required fields and CEL rules come
out exactly as `kubectl apply` enforces them. tests/test_chart_docs.py regenerates the file and
fails when the committed copy differs, so the reference cannot drift from the schema.

    python scripts/gen_crd_docs.py           # rewrite docs/configuration.md
    python scripts/gen_crd_docs.py --check   # exit 1 (and say so) if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "crds"
OUTPUT = REPO / "docs" / "configuration.md"

Schema = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One field of the reference table."""

    path: str
    type: str
    required: bool
    default: str
    validation: str
    description: str


def load_crds(crd_dir: Path = CRD_DIR) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition document in crd_dir, sorted by name."""
    crds: list[dict[str, Any]] = []
    for path in sorted(crd_dir.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    if not crds:
        raise SystemExit(f"gen_crd_docs: no CustomResourceDefinition found in {crd_dir}")
    return sorted(crds, key=lambda c: str(c["metadata"]["name"]))


def storage_version(crd: dict[str, Any]) -> dict[str, Any]:
    for version in crd["spec"]["versions"]:
        if version.get("storage"):
            return dict(version)
    raise SystemExit(f"gen_crd_docs: {crd['metadata']['name']} has no storage version")


def _type_of(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return "object (free-form)"
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"[]{_type_of(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema and "properties" not in schema:
        extra = schema["additionalProperties"]
        return f"map[string]{_type_of(extra) if isinstance(extra, dict) else 'any'}"
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return kind


def _code(value: Any) -> str:
    return "`" + json.dumps(value, separators=(", ", ": ")) + "`"


def _validation(schema: Schema) -> str:
    parts: list[str] = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(_code(v) for v in schema["enum"]))
    for key, label in (("minimum", ">="), ("maximum", "<=")):
        if key in schema:
            exclusive = schema.get(f"exclusive{key.capitalize()}", False)
            parts.append(f"{label.rstrip('=') if exclusive else label} {schema[key]}")
    for key, label in (("minLength", "length >="), ("maxLength", "length <="),
                       ("minItems", "items >="), ("maxItems", "items <="),
                       ("minProperties", "keys >="), ("maxProperties", "keys <=")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "multipleOf" in schema:
        parts.append(f"multiple of {schema['multipleOf']}")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    if schema.get("x-kubernetes-list-type") in ("set", "map"):
        keys = schema.get("x-kubernetes-list-map-keys")
        parts.append("unique items" if not keys else f"unique by {', '.join(keys)}")
    for rule in schema.get("x-kubernetes-validations", []):
        message = rule.get("message") or rule.get("messageExpression") or ""
        parts.append(f"rule `{rule['rule']}`" + (f" ({message})" if message else ""))
    return "; ".join(parts)


def _cell(text: str) -> str:
    """Markdown-table-safe text: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def walk(schema: Schema, path: str, required: bool = False) -> Iterator[Row]:
    """Rows for `schema` at `path` and everything beneath it, depth first in declaration order."""
    yield Row(
        path=path,
        type=_type_of(schema),
        required=required,
        default=_code(schema["default"]) if "default" in schema else "",
        validation=_validation(schema),
        description=str(schema.get("description", "")),
    )
    needed = set(schema.get("required", []))
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}", name in needed)
    items = schema.get("items")
    if isinstance(items, dict) and ("properties" in items or "items" in items):
        for name, child in items.get("properties", {}).items():
            yield from walk(child, f"{path}[].{name}", name in set(items.get("required", [])))
        if "items" in items:
            yield from walk(items["items"], f"{path}[][]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in extra:
        for name, child in extra["properties"].items():
            yield from walk(child, f"{path}.<key>.{name}", name in set(extra.get("required", [])))


def _table(rows: list[Row]) -> list[str]:
    lines = ["| Field | Type | Required | Default | Validation | Description |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| `{row.path}` | {_cell(row.type)} | {'yes' if row.required else ''} | {_cell(row.default)} "
            f"| {_cell(row.validation)} | {_cell(row.description)} |"
        )
    return lines


def render_crd(crd: dict[str, Any]) -> list[str]:
    names = crd["spec"]["names"]
    version = storage_version(crd)
    group = crd["spec"]["group"]
    root: Schema = version["schema"]["openAPIV3Schema"]
    lines = [
        f"## {names['kind']} (`{group}/{version['name']}`)",
        "",
        f"Plural `{names['plural']}`"
        + (f", short names {', '.join(f'`{s}`' for s in names.get('shortNames', []))}" if names.get("shortNames") else "")
        + f", scope {crd['spec']['scope']}.",
        "",
    ]
    if root.get("description"):
        lines += [_cell(str(root["description"])), ""]
    root_rules = _validation({"x-kubernetes-validations": root.get("x-kubernetes-validations", [])})
    if root_rules:
        lines += [f"Object-level rules: {_cell(root_rules)}", ""]
    for section in ("spec", "status"):
        schema = root.get("properties", {}).get(section)
        if schema is None:
            continue
        title = "Spec" if section == "spec" else "Status (written by the operator, read-only)"
        lines += [f"### {title}", ""]
        lines += _table(list(walk(schema, section, section in set(root.get("required", [])))))
        lines.append("")
    columns = version.get("additionalPrinterColumns", [])
    if columns:
        lines += ["### `kubectl get` columns", "", "| Column | Type | From |", "|---|---|---|"]
        for column in columns:
            lines.append(f"| {_cell(column['name'])} | {column['type']} | `{_cell(column['jsonPath'])}` |")
        lines.append("")
    return lines


def render(crd_dir: Path = CRD_DIR) -> str:
    lines = [
        "# UCMCluster configuration reference",
        "",
        "<!-- Generated by scripts/gen_crd_docs.py from crds/. Do not edit by hand: edit the CRD, then run",
        "     `python scripts/gen_crd_docs.py` (tests/test_chart_docs.py fails when this file is stale). -->",
        "",
        "Every field below is checked by the API server when you `kubectl apply` a resource: types, bounds,",
        "enums, patterns and the CEL rules listed under Validation. What the schema cannot check (for example",
        "that all pools produce identical KV block hashes) the operator checks and reports as `Valid=False`",
        "with the field path. `[]` in a path means \"each item of the list\".",
        "",
    ]
    for crd in load_crds(crd_dir):
        lines += render_crd(crd)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(REPO)} is out of date: run python scripts/gen_crd_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

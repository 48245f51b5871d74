"""docs/configuration.md is generated from the CRD; these tests keep it from drifting."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_crd_docs.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crd_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert _generator().render() == committed, (
        "docs/configuration.md is stale: the CRD in crds/ changed. Run: python scripts/gen_crd_docs.py"
    )


def test_every_spec_field_of_the_crd_is_documented() -> None:
    crd = yaml.safe_load((REPO / "crds" / "ucm.dev_ucmclusters.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["storage"])["schema"]["openAPIV3Schema"]
    doc = (REPO / "docs" / "configuration.md").read_text()

    def paths(node: dict[str, object], prefix: str) -> list[str]:
        found = [prefix]
        for name, child in dict(node.get("properties", {})).items():  # type: ignore[call-overload]
            found += paths(child, f"{prefix}.{name}")
        items = node.get("items")
        if isinstance(items, dict):
            for name, child in items.get("properties", {}).items():
                found += paths(child, f"{prefix}[].{name}")
        return found

    spec_paths = paths(schema["properties"]["spec"], "spec")
    assert len(spec_paths) > 20
    missing = [p for p in spec_paths if f"| `{p}` |" not in doc]
    assert not missing, f"fields missing from docs/configuration.md: {missing}"


def test_generator_renders_schema_facts(tmp_path: Path) -> None:
    """Defaults, enums, bounds, required and CEL messages come out of a schema as the API server sees them."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.dev"},
        "spec": {
            "group": "example.dev",
            "scope": "Namespaced",
            "names": {"kind": "Thing", "plural": "things"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                    "type": "object", "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 16, "default": 16, "description": "a | b",
                                 "x-kubernetes-validations": [{"rule": "self % 16 == 0", "message": "multiple of 16"}]},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "pools": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                    },
                }}}},
            }],
        },
    }
    (tmp_path / "thing.yaml").write_text(yaml.safe_dump(crd))
    text = _generator().render(tmp_path)
    assert "| `spec.size` | integer | yes | `16` | >= 16; rule `self % 16 == 0` (multiple of 16) | a \\| b |" in text
    assert '| `spec.mode` | string |  |  | one of `"a"`, `"b"` |  |' in text
    assert "| `spec.pools[].name` | string |" in text


def test_check_mode_accepts_the_committed_file() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_readme_links_and_commands_point_at_real_things() -> None:
    """Relative links resolve, and the configuration reference is linked (a newcomer follows them)."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)
    relative = [link for link in links if "://" not in link]
    assert "docs/configuration.md" in relative
    missing = [link for link in relative if not (REPO / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    for target in ("make demo", "make test", "UCM_DEMO_EXIT_WHEN_SERVING=1", "ucm store stats --path"):
        assert target in readme, f"README.md no longer mentions {target}"

"""Static checks of the Dockerfiles in images/.

No Docker engine exists here, so the images are never built in CI. What breaks an image build
or its start-up without anyone noticing is checked instead: a COPY source that does not exist or
that the image's .dockerignore leaves out, an ENTRYPOINT that is not a console script of the
installed distribution, an operator image that would pull in torch or vLLM, a worker base image
that drifts from the vLLM version pyproject.toml pins, an image that runs as root.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
VENV_BIN = Path(sys.executable).parent
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))


@dataclass
class Stage:
    base: str
    name: str | None
    copies: list[tuple[list[str], str, dict[str, str]]] = field(default_factory=list)  # sources, dest, flags
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    runs: list[str] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """The instructions this test needs, per build stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        rest = rest.strip()
        if instr == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        elif instr == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif instr in ("COPY", "ADD"):
            assert instr == "COPY", f"{path.name}: use COPY, not ADD ({line})"
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = {w.split("=", 1)[0][2:]: w.partition("=")[2] for w in words if w.startswith("--")}
            paths = [w for w in words if not w.startswith("--")]
            stages[-1].copies.append((paths[:-1], paths[-1], flags))
        elif instr in ("ENTRYPOINT", "CMD"):
            assert rest.startswith("["), (
                f"{path.name}: {instr} must use the exec (JSON) form so the process gets signals: {line}"
            )
            setattr(stages[-1], instr.lower(), json.loads(rest))
        elif instr == "USER":
            stages[-1].user = rest
        elif instr == "RUN":
            stages[-1].runs.append(rest)
    return stages


def dockerignore_excludes(ignore_file: Path, rel: str) -> bool:
    """Whether BuildKit leaves `rel` (a path relative to the context) out of the build context.

    Last matching pattern wins; a pattern matching a parent directory covers what is under it.
    """
    patterns = [
        p.strip() for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if any(fnmatch.fnmatchcase(c, pat) or fnmatch.fnmatchcase(c, pat.replace("**/", "")) for c in candidates):
            excluded = not negate
    return excluded


def extra_requirements(extra: str) -> set[str]:
    """Distribution names an extra pulls in, following `ucm[...]` self-references."""
    names: set[str] = set()
    for req in PYPROJECT["project"]["optional-dependencies"][extra]:
        name = re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower()
        if name == "ucm":
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):  # type: ignore[union-attr]
                names |= extra_requirements(sub.strip())
        else:
            names.add(name)
    return names


def installed_extra(stages: list[Stage]) -> set[str]:
    """The pyproject extras the image installs with `pip install .[EXTRA]` (empty set: plain `.`)."""
    extras: set[str] = set()
    for stage in stages:
        for run in stage.runs:
            for match in re.finditer(r"pip install[^&;]*?[\"']?\.(\[([\w,]+)\])?[\"']?(\s|$)", run):
                if match.group(2):
                    extras |= set(match.group(2).split(","))
    return extras


def test_every_image_has_a_dockerfile_and_an_ignore_file() -> None:
    assert {p.name for p in DOCKERFILES} == {"operator.Dockerfile", "worker.Dockerfile", "router.Dockerfile"}
    for dockerfile in DOCKERFILES:
        assert (IMAGES / f"{dockerfile.name}.dockerignore").is_file(), (
            f"{dockerfile.name} has no {dockerfile.name}.dockerignore: the build context would ship .venv"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_context(dockerfile: Path) -> None:
    stage_names = {s.name for s in parse_dockerfile(dockerfile) if s.name}
    ignore = IMAGES / f"{dockerfile.name}.dockerignore"
    checked = 0
    for stage in parse_dockerfile(dockerfile):
        for sources, _dest, flags in stage.copies:
            if "from" in flags:
                assert flags["from"] in stage_names, f"{dockerfile.name}: COPY --from={flags['from']} names no stage"
                continue
            for src in sources:
                path = REPO / src
                assert path.exists(), f"{dockerfile.name}: COPY source {src!r} does not exist in the repository"
                assert not dockerignore_excludes(ignore, src.rstrip("/")), (
                    f"{dockerfile.name}: COPY source {src!r} is excluded by {ignore.name}"
                )
                checked += 1
    assert checked >= 3, f"{dockerfile.name}: expected it to copy pyproject.toml, README.md and the sources"


def test_dockerignore_keeps_the_venv_out() -> None:
    for dockerfile in DOCKERFILES:
        ignore = IMAGES / f"{dockerfile.name}.dockerignore"
        for heavy in (".venv", ".cache", ".git", "e2e", "ucm/__pycache__"):
            assert dockerignore_excludes(ignore, heavy), f"{ignore.name} lets {heavy} into the build context"
        assert not dockerignore_excludes(ignore, "ucm/store/base.py")


def test_pyproject_build_inputs_are_copied() -> None:
    """setuptools reads the readme and package dirs named in pyproject.toml; each image must copy them."""
    needed = {PYPROJECT["project"]["readme"], "pyproject.toml"}
    needed |= {f"{d}/" for d in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"] if d != "."}
    needed |= {f"{p.rstrip('*')}/" for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
               if (REPO / p.rstrip("*")).is_dir()}
    for dockerfile in DOCKERFILES:
        copied = {src for stage in parse_dockerfile(dockerfile) for srcs, _dest, flags in stage.copies
                  if "from" not in flags for src in srcs}
        assert needed <= copied, f"{dockerfile.name} does not copy {sorted(needed - copied)}"


def _final(dockerfile: str) -> Stage:
    return parse_dockerfile(IMAGES / dockerfile)[-1]


@pytest.mark.parametrize(
    ("dockerfile", "script", "subcommand"),
    [("operator.Dockerfile", "ucm-operator", ["run"]), ("router.Dockerfile", "ucm", ["router", "serve"])],
)
def test_entrypoint_is_an_installed_console_script(dockerfile: str, script: str, subcommand: list[str]) -> None:
    stage = _final(dockerfile)
    command = (stage.entrypoint or []) + (stage.cmd or [])
    assert command[0] == script, f"{dockerfile}: ENTRYPOINT should start with {script}, got {command}"
    assert script in SCRIPTS, f"{script} is not a [project.scripts] console script in pyproject.toml"
    module, _, func = SCRIPTS[script].partition(":")
    installed = {ep.name: ep.value for ep in distribution("ucm").entry_points if ep.group == "console_scripts"}
    assert installed.get(script) == SCRIPTS[script], "the installed ucm distribution is stale: pip install -e ."
    executable = VENV_BIN / script
    assert executable.is_file(), f"{executable} missing after install"
    assert command[1:] == subcommand, f"{dockerfile}: expected `{script} {' '.join(subcommand)}`, got {command}"
    # The sub-command must really exist: `SCRIPT SUBCOMMAND --help` exits 0.
    result = subprocess.run([str(executable), *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"`{script} {' '.join(subcommand)} --help` failed ({module}.{func}):\n{result.stderr}"


def test_worker_is_pinned_vllm_plus_ucm_with_the_plugin_entry_point() -> None:
    stages = parse_dockerfile(IMAGES / "worker.Dockerfile")
    pins = [r for r in PYPROJECT["project"]["optional-dependencies"]["worker"] if r.startswith("vllm==")]
    assert pins, "pyproject.toml's worker extra no longer pins vllm==X"
    version = pins[0].removeprefix("vllm==")
    assert stages[0].base == f"vllm/vllm-openai:v{version}", (
        f"worker.Dockerfile is FROM {stages[0].base}, but pyproject.toml pins vllm=={version}"
    )
    # torch and vLLM come from the base image: installing the worker extra could swap its CUDA torch.
    # What pip installs is the directory pyproject.toml was copied to, with no [extra].
    source_dir = next(dest for srcs, dest, _ in stages[-1].copies if "pyproject.toml" in srcs).rstrip("/")
    installs = [m.group(1) for run in stages[-1].runs for m in re.finditer(r"pip install (?:--\S+ )*(\S+)", run)]
    assert installs == [source_dir], f"worker.Dockerfile should `pip install {source_dir}` (no extra), got {installs}"
    # `vllm serve` is the base image's server; the plugin entry point is what makes UCMConnector load.
    assert stages[-1].entrypoint == ["vllm", "serve"]
    vllm_scripts = {ep.name for ep in distribution("vllm").entry_points if ep.group == "console_scripts"}
    assert "vllm" in vllm_scripts and (VENV_BIN / "vllm").is_file()
    plugin = PYPROJECT["project"]["entry-points"]["vllm.general_plugins"]["ucm"]
    assert plugin in " ".join(stages[-1].runs), "worker.Dockerfile should verify the plugin entry point registers"
    installed = {ep.name: ep.value for ep in distribution("ucm").entry_points if ep.group == "vllm.general_plugins"}
    assert installed.get("ucm") == plugin


def test_operator_and_router_images_carry_no_torch_or_vllm() -> None:
    heavy = {"torch", "vllm", "kopf"}
    for dockerfile, extra, allowed in (("operator.Dockerfile", "operator", {"kopf"}),
                                       ("router.Dockerfile", "router", set())):
        stages = parse_dockerfile(IMAGES / dockerfile)
        assert installed_extra(stages) == {extra}, f"{dockerfile} should install exactly .[{extra}]"
        core = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
        pulled = extra_requirements(extra) | core
        assert not (pulled & (heavy - allowed)), f"{dockerfile}: .[{extra}] pulls in {sorted(pulled & heavy)}"
        assert stages[0].base.startswith("python:3.11-slim"), f"{dockerfile}: expected a slim Python 3.11 base"


def test_operator_and_router_run_as_the_chart_non_root_user() -> None:
    values = yaml.safe_load((REPO / "charts/ucm/values.yaml").read_text())
    chart_uid = values["podSecurityContext"]["runAsUser"]
    for dockerfile in ("operator.Dockerfile", "router.Dockerfile"):
        user = _final(dockerfile).user
        assert user is not None, f"{dockerfile}: the final stage has no USER (it would run as root)"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: USER must be a numeric non-root uid, got {user}"
        assert int(uid) == chart_uid, f"{dockerfile}: USER {uid} differs from the chart's runAsUser {chart_uid}"


def test_readme_gives_the_build_commands() -> None:
    readme = (REPO / "README.md").read_text()
    for dockerfile in DOCKERFILES:
        assert f"-f images/{dockerfile.name}" in readme, f"README.md has no build command for {dockerfile.name}"

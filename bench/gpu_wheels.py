"""Fill ``.whl/`` with the wheels the air-gapped GPU node lacks (``make gpu-wheels``), for ``bench/gpu_check.sh``.

The node (Python 3.12, x86-64, its own CUDA torch 2.11, no network) has torch, numpy, pillow, pyyaml,
tqdm, matplotlib, scikit-learn, psutil, py-cpuinfo, msgpack, ninja, einops, packaging, cloudpickle and
nvidia-ml-py (its image's package list, read 2026-11-17); it lacks DeepSpeed, webdataset, submitit,
pydantic and MLflow. MLflow is not carried: the check runs with ``tracking.enabled=false``.
Versions are this environment's, so the node runs what the tests here ran. Each wheel's ``Requires-Dist``
is then checked: a requirement neither carried nor on the node's list stops with its name.

    .venv/bin/python bench/gpu_wheels.py [--dest .whl]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed publishes only a source distribution for recent releases (a binary-only download picks 0.3.1):
# build its pure-Python wheel here.
BUILT = ["deepspeed"]
# Downloaded as wheels for CPython 3.12 on manylinux x86-64 (pure-Python ones match any platform).
DOWNLOADED = [
    "webdataset",
    "braceexpand",
    "submitit",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # pydantic wants >= 4.16, newer than the node's may be
]
ON_NODE = {
    "torch",
    "numpy",
    "pillow",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "scikit-learn",
    "psutil",
    "py-cpuinfo",
    "msgpack",
    "ninja",
    "einops",
    "packaging",
    "cloudpickle",
    "nvidia-ml-py",
}
NODE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def requirements_of(wheel: Path) -> list[Requirement]:
    """The wheel's unconditional requirements on the node (extras and other platforms left out)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or Marker(str(req.marker)).evaluate(NODE_ENV):
                reqs.append(req)
    return reqs


def wheel_name(wheel: Path) -> str:
    return canonicalize_name(wheel.name.split("-")[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = p.parse_args()
    pins = {name: version(name) for name in BUILT + DOWNLOADED}
    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp:
        stage = Path(tmp)
        for name in BUILT:
            pip("wheel", "-q", "--no-deps", "-w", str(stage), f"{name}=={pins[name]}")
        platform_args = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
        pip(
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            str(stage),
            *(f"{name}=={pins[name]}" for name in DOWNLOADED),
        )
        wheels = sorted(stage.glob("*.whl"))
        names = {wheel_name(w) for w in wheels}
        missing_wheels = sorted({canonicalize_name(n) for n in pins} - names)
        if missing_wheels:
            print(f"gpu_wheels: no wheel came for {', '.join(missing_wheels)}", file=sys.stderr)
            return 1
        unmet = sorted(
            f"{req.name} (needed by {wheel_name(w)})"
            for w in wheels
            for req in requirements_of(w)
            if canonicalize_name(req.name) not in names | ON_NODE
        )
        if unmet:
            print(f"gpu_wheels: neither carried nor on the node: {', '.join(unmet)}", file=sys.stderr)
            return 1
        # Replace the folder whole: two versions of one package would stop the install on the node.
        if args.dest.exists():
            shutil.rmtree(args.dest)
        args.dest.mkdir(parents=True)
        for w in wheels:
            shutil.move(str(w), args.dest / w.name)
    total = 0
    for w in sorted(args.dest.glob("*.whl")):
        size = w.stat().st_size
        total += size
        print(f"{size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total / 2**20:7.2f} MiB  total in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wheel carries the CUDA sources, and an installed wheel finds them
through importlib.resources (not through the repository)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the wheel fixture is in conftest.py


def test_wheel_contains_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "bnkernels").rglob("__init__.py")}
    assert packages, "found the package"
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel"


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    where = "bnkernels/backends/cupy_backend/kernels"
    cu = {p.name for p in (ROOT / where).iterdir() if p.suffix in (".cu", ".cuh")}
    assert cu, "the repository has kernel sources"
    for name in cu:
        assert f"{where}/{name}" in names


def test_installed_wheel_reads_sources_through_importlib_resources(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("from bnkernels.backends.cupy_backend import sources as s; "
            "src = s.read_source(); print(s.source_dir()); "
            "assert all((s.source_dir() / f).is_file() for f in ('bn_common.cuh', 'bn_reduce.cuh', "
            "'bn_elementwise.cuh')); assert 'bn_stats' in open(s.source_dir() / 'bn_reduce.cuh').read()")
    # from a folder outside the repository, with only the installed wheel on the path
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout, f"sources were not read from the installed wheel: {proc.stdout}"

"""Shared by tests/ and bench/: every test with a ``backend`` argument runs
once per CPU backend of this release.

Usable backends run; those that cannot run here (an optional package
missing) are skipped with the reason.
"""
import pytest

import bnkernels


def cpu_backend_params():
    params = []
    for status in bnkernels.available_backends().values():
        if status.device != "cpu":
            continue
        marks = () if status.available else pytest.mark.skip(
            reason=f"{status.name}: {status.reason} (to get it: {status.install})")
        params.append(pytest.param(status.name, marks=marks, id=status.name))
    return params


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cpu_backend_params())

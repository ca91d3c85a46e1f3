"""``backends/interface.py``: every registered backend module implements
the ``Backend`` protocol, and what is missing is named."""
import importlib

import pytest

from bnkernels.backends import BACKENDS
from bnkernels.backends.interface import Backend, missing_members


@pytest.mark.parametrize("spec", BACKENDS, ids=lambda s: s.name)
def test_every_backend_implements_the_interface(spec):
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:  # an optional package missing here
        pytest.skip(f"{spec.name}: {e}")
    assert missing_members(module) == []
    assert isinstance(module, Backend)
    assert module.name == spec.name


def test_missing_members_names_them():
    class Half:
        name = "half"

        def asarray(self, x):
            return x

    missing = missing_members(Half())
    assert "statistics" in missing and "backward_apply" in missing and "asarray" not in missing
    assert not isinstance(Half(), Backend)

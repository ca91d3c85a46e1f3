"""What a GPU backend sees of an argument (``members``, ``prepared``)."""
from __future__ import annotations


class Operand:
    """An argument as a GPU backend sees it: ``kind`` (``"numpy"`` for host
    data, else the library of the device array: ``"cupy"``, ``"numba"``,
    ``"torch"``, ``"cai"``), what the caller passed (``source``) and either
    its ``host`` NumPy array or its ``device`` array (the backend's kind)."""

    def __init__(self, kind: str, source, host=None, device=None):
        self.kind, self.source, self.host, self.device = kind, source, host, device

    @property
    def is_host(self) -> bool:
        return self.host is not None

    @property
    def array(self):
        return self.host if self.host is not None else self.device

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

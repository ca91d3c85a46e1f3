"""The zeroed counters of the reductions' last-block merge, one array per
(device or context, stream), shared by the launches on that stream: the
kernels leave them zero again after each launch, so they are allocated and
zeroed once."""
from __future__ import annotations


class CounterCache(dict):
    """``{key: counters}``; :meth:`zeroed` grows an entry when needed."""

    def zeroed(self, key, n: int, make):
        """At least ``n`` zeroed counters for ``key``; ``make(size)``
        allocates zeroed ones (at least 64, so small launches share one)."""
        cur = self.get(key)
        if cur is None or cur.size < n:
            cur = make(max(n, 64))
            self[key] = cur
        return cur

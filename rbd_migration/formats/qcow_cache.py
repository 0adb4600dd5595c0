"""What an open qcow chain holds in memory, and the cache that bounds it.

As QEMU's block/qcow2-cache.c keeps L2 tables, but bounded in bytes across
the whole backing chain: the active L1 tables are held while the chain is
open, and every other table (and what it decodes to) lives in one LRU
cache with what they leave of ``metadata_bytes``.
"""
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Tuple, Union

from ..context import SourceContext
from ..errors import InvalidArgument

#: Decompressed clusters kept, in bytes (data, not metadata: outside the
#: ``metadata_bytes`` budget).
CLUSTER_CACHE_BYTES = 16 << 20


class _LruCache:
    """Values are loaded outside the lock, so one slow stream read does not
    stall the other readers; two threads may then load the same key, which
    costs a read but is harmless.  The budget may be a function, read at
    each insertion: what a chain's L1 tables leave of its metadata budget."""

    def __init__(self, budget: Union[int, Callable[[], int]]) -> None:
        self._budget = budget if callable(budget) else (lambda: budget)
        self._used = 0
        self._items: 'OrderedDict[Hashable, Tuple[Any, int]]' = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Tuple[Any, int]]) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value, weight = load()
        with self._lock:
            budget = self._budget()
            if key not in self._items and weight <= budget:
                self._items[key] = (value, weight)
                self._used += weight
                while self._used > budget:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._used -= dropped
        return value


class _Budget:
    """What one open chain holds in memory, shared by its layers: the active
    L1 tables (held while open, ``pinned``) and one LRU cache of all other
    metadata (L2 tables, their decoded runs, snapshot L1 tables) within
    what the L1 tables leave of ``metadata_bytes``.  Decompressed clusters
    are data, cached apart."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.limits = ctx.limits
        self.pinned = 0
        self.metadata = _LruCache(
            lambda: self.limits.metadata_bytes - self.pinned)
        self.clusters = _LruCache(CLUSTER_CACHE_BYTES)

    def pin(self, nbytes: int, where: str) -> None:
        """Hold ``nbytes`` of L1 table for as long as the chain is open."""
        total = self.pinned + nbytes
        if total > self.limits.metadata_bytes:
            raise InvalidArgument(f'{where}: ' + self.limits.refuse(
                'metadata_bytes', 'holding the qcow2 L1 tables of the '
                'backing chain (bytes)', total))
        self.pinned = total

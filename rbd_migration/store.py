"""The part of the mgr's KV store the module keeps its records in.

A protocol, so that the queue, the batch book, the adapter engine's records
and the prepare notes take the mgr module itself in the mgr and a dict in
tests, and none of them imports another to name it.
"""
import threading
from typing import Dict, Optional, Protocol


class Store(Protocol):
    """The subset of MgrModule's KV store API the module uses."""

    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]: ...
    def set_store(self, key: str, val: Optional[str]) -> None: ...
    def get_store_prefix(self, key_prefix: str) -> Dict[str, str]: ...


class Mirror:
    """The module's keys, read from the mgr once and then kept here.

    ceph-mgr 16.2's ``get_store_prefix`` holds the mgr's module lock while it
    waits for the interpreter lock; another module holding the interpreter
    lock while it waits for the module lock stops the mgr for good (seen: the
    stock ``status`` module's finisher against a ``status`` of ours, which
    lists the adapter engine's records by prefix).  The module is the only
    writer of its keys, so after one read at start every read is answered
    here, without the mgr's locks; writes go to the mgr as before, one at a
    time and in the order they change the mirror, while reads go on.
    """

    def __init__(self, backing: Store) -> None:
        self._backing = backing
        self._keys: Optional[Dict[str, str]] = None
        self._lock = threading.Lock()
        #: Orders writes to the mgr as they change the mirror.
        self._writing = threading.Lock()

    def _loaded(self) -> Dict[str, str]:
        if self._keys is None:
            self._keys = dict(self._backing.get_store_prefix(''))
        return self._keys

    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]:
        with self._lock:
            return self._loaded().get(key, default)

    def get_store_prefix(self, key_prefix: str) -> Dict[str, str]:
        with self._lock:
            return {k: v for k, v in self._loaded().items() if k.startswith(key_prefix)}

    def set_store(self, key: str, val: Optional[str]) -> None:
        with self._writing:
            with self._lock:
                keys = self._loaded()
                if val is None:
                    keys.pop(key, None)
                else:
                    keys[key] = val
            self._backing.set_store(key, val)

"""The part of the mgr's KV store the module keeps its records in.

A protocol, so that the queue, the batch book, the adapter engine's records
and the prepare notes take the mgr module itself in the mgr and a dict in
tests, and none of them imports another to name it.
"""
from typing import Dict, Optional, Protocol


class Store(Protocol):
    """The subset of MgrModule's KV store API the module uses."""

    def get_store(self, key: str, default: Optional[str] = None) -> Optional[str]: ...
    def set_store(self, key: str, val: Optional[str]) -> None: ...
    def get_store_prefix(self, key_prefix: str) -> Dict[str, str]: ...

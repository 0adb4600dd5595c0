"""The module's keys mirrored in memory: the mgr is asked for them by prefix
once, every write still reaches it, in order, and reads never wait for a
write the mgr is slow to take."""
import threading
from typing import Dict, List, Optional, Tuple

from rbd_migration.store import Mirror
from tests.queueharness import TIMEOUT, MemStore


class CountingStore(MemStore):
    """MemStore that counts reads by prefix and can hold a write back."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix_reads = 0
        self.writes: List[Tuple[str, Optional[str]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.writing = threading.Event()

    def get_store_prefix(self, prefix: str) -> Dict[str, str]:
        self.prefix_reads += 1
        return super().get_store_prefix(prefix)

    def set_store(self, key: str, val: Optional[str]) -> None:
        self.writing.set()
        assert self.hold.wait(TIMEOUT)
        self.writes.append((key, val))
        super().set_store(key, val)


def test_the_mgr_is_read_once_and_every_write_reaches_it() -> None:
    backing = CountingStore()
    backing.data.update({'task/1': 'a', 'task/2': 'b', 'batch/1': 'c'})
    store = Mirror(backing)
    assert store.get_store_prefix('task/') == {'task/1': 'a', 'task/2': 'b'}
    store.set_store('task/3', 'd')
    store.set_store('task/1', None)
    store.set_store('batch/1', 'e')
    assert store.get_store('task/3') == 'd'
    assert store.get_store('task/1') is None
    assert store.get_store('task/1', 'default') == 'default'
    assert store.get_store_prefix('task/') == {'task/2': 'b', 'task/3': 'd'}
    assert store.get_store_prefix('') == backing.data
    assert backing.writes == [('task/3', 'd'), ('task/1', None), ('batch/1', 'e')]
    assert backing.prefix_reads == 1


def test_a_new_mirror_reads_what_the_last_one_wrote() -> None:
    backing = CountingStore()
    Mirror(backing).set_store('seq', '7')
    assert Mirror(backing).get_store('seq') == '7'


def test_reads_go_on_while_the_mgr_takes_a_write() -> None:
    backing = CountingStore()
    store = Mirror(backing)
    store.get_store('x')
    backing.hold.clear()
    writer = threading.Thread(target=store.set_store, args=('x', '1'))
    writer.start()
    try:
        assert backing.writing.wait(TIMEOUT)
        assert store.get_store('x') == '1'  # answered while the write waits
        assert store.get_store_prefix('x') == {'x': '1'}
    finally:
        backing.hold.set()
        writer.join(TIMEOUT)
    assert backing.data == {'x': '1'}

"""The listing status answers from while tasks run: how old it may be, and
that the module's own changes always show."""
import threading
from typing import Callable, List, Tuple

from rbd_migration.engine.migration import ImageRef, MigrationInfo
from rbd_migration.listing import Listing


def info(image_id: str, state: str = 'prepared') -> MigrationInfo:
    return MigrationInfo(dest=ImageRef(1, 'rbd', '', f'img-{image_id}', image_id), state=state,
                         state_description='')


class Cluster:
    """What a scan reads, and how many scans were made."""

    def __init__(self) -> None:
        self.now = 100.0
        self.migrations = {'a': info('a')}
        self.scans = 0
        self.gate = threading.Event()
        self.gate.set()
        self.scanning = threading.Event()

    def clock(self) -> float:
        return self.now

    def scan(self) -> List[MigrationInfo]:
        self.scans += 1
        seen = sorted(self.migrations.values(), key=lambda i: str(i.dest))
        self.scanning.set()
        assert self.gate.wait(10)
        return seen


def listed_once() -> Tuple[Cluster, Listing]:
    c = Cluster()
    listing = Listing(c.scan, c.clock)
    listing.recent(2.0)
    return c, listing


def eventually(done: Callable[[], bool]) -> None:
    for _ in range(1000):
        if done():
            return
        threading.Event().wait(0.01)


def states(infos: List[MigrationInfo]) -> List[str]:
    return [f'{i.dest.id}:{i.state}' for i in infos]


def test_fresh_reads_the_cluster_every_time() -> None:
    c = Cluster()
    listing = Listing(c.scan, c.clock)
    listing.fresh()
    c.migrations['b'] = info('b')
    assert states(listing.fresh().infos) == ['a:prepared', 'b:prepared']
    assert c.scans == 2


def test_recent_answers_from_memory_until_max_age() -> None:
    c, listing = listed_once()
    c.migrations['b'] = info('b')
    c.now += 0.4
    assert states(listing.recent(2.0).infos) == ['a:prepared']   # not a quarter as old
    assert c.scans == 1
    c.now += 2.0
    listed = listing.recent(2.0)   # too old: listed in the foreground
    assert states(listed.infos) == ['a:prepared', 'b:prepared'] and c.scans == 2
    assert listed.age(c.now) == 0.0


def test_a_quarter_of_max_age_refreshes_in_the_background() -> None:
    c, listing = listed_once()
    c.migrations['b'] = info('b')
    c.now += 1.5
    c.gate.clear()
    c.scanning.clear()
    assert states(listing.recent(2.0).infos) == ['a:prepared']   # answered at once
    assert c.scanning.wait(10)
    assert states(listing.recent(2.0).infos) == ['a:prepared']   # one refresh at a time
    assert c.scans == 2
    c.gate.set()
    eventually(lambda: len(listing.recent(2.0).infos) == 2)
    assert states(listing.recent(2.0).infos) == ['a:prepared', 'b:prepared']


def test_a_change_made_elsewhere_forces_a_new_listing() -> None:
    c, listing = listed_once()
    c.migrations['a'] = info('a', 'executed')
    listing.changed()
    assert states(listing.recent(2.0).infos) == ['a:executed']
    assert c.scans == 2


def test_a_replaced_migration_shows_without_a_scan() -> None:
    c, listing = listed_once()
    listing.replace('b', info('b'))
    listing.replace('a', info('a', 'executed'))
    assert states(listing.recent(2.0).infos) == ['a:executed', 'b:prepared']
    listing.replace('a', None)
    assert states(listing.recent(2.0).infos) == ['b:prepared']
    assert c.scans == 1


def test_a_scan_begun_before_a_change_does_not_hide_it() -> None:
    c, listing = listed_once()
    c.now += 0.1
    c.gate.clear()
    c.scanning.clear()
    slow = threading.Thread(target=listing.fresh)
    slow.start()
    assert c.scanning.wait(10)       # it has read: only 'a', prepared
    c.migrations['a'] = info('a', 'executed')
    listing.replace('a', info('a', 'executed'))
    c.gate.set()
    slow.join(10)
    assert states(listing.recent(2.0).infos) == ['a:executed']


def test_warm_refreshes_without_being_asked() -> None:
    c = Cluster()
    listing = Listing(c.scan, c.clock)
    listing.warm(2.0)                  # nothing listed yet: list now
    eventually(lambda: c.scans == 1 and bool(listing.recent(2.0).infos))
    assert c.scans == 1
    listing.warm(2.0)                  # young enough
    assert c.scans == 1


def test_a_slow_scan_widens_the_limit() -> None:
    c = Cluster()

    def slow_scan() -> List[MigrationInfo]:
        c.now += 1.0
        return c.scan()

    listing = Listing(slow_scan, c.clock)
    first = listing.fresh()
    assert listing.limit(2.0) == 8.0   # eight times the scan
    c.now += 5.0
    assert listing.recent(2.0) is first   # not listed again in the foreground
    eventually(lambda: c.scans == 2)   # but in the background
    assert c.scans == 2

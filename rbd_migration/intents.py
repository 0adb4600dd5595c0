"""Imports librbd is still preparing, noted so that a failover cannot
orphan their target.

librbd's import prepare creates the target, copies every snapshot of the
source onto it (about a second each on a busy cluster) and writes the
target's migration header last.  A mgr that fails over in between leaves a
plain image under the target's name: no migration header, so neither
``rbd migration`` nor this module's status finds it, and the name is taken.
A note written before the prepare and dropped after it lets the next mgr
remove exactly such an image, and nothing else.
"""
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, ClassVar, Iterator, List, Optional

import rados
import rbd

from .images import ImageSpec
from .inventory import OP_FEATURE_MIGRATION
from .records import NewerRecord, Record

if TYPE_CHECKING:
    from .engine.librbd import LibrbdEngine
    from .store import Store

log = logging.getLogger(__name__)

INTENT_PREFIX = 'preparing/'
#: The layout of the notes this code writes (the first wrote version 1 too).
INTENT_RECORD_VERSION = 1
# The target's create_timestamp comes from an OSD's clock, the note's time
# from a mgr's: an image older than the note by more than this was not
# created by that prepare.
CLOCK_SKEW = 300.0
# How long the sweep waits for the cut client's watch on the target to go
# (a failed mgr's watch times out after 30 s unless it is blocklisted).
WATCH_WAIT = 90.0


@dataclasses.dataclass
class Intent(Record):
    """One import prepare handed to librbd and not yet answered."""

    KIND: ClassVar[str] = 'prepare note'
    VERSION: ClassVar[int] = INTENT_RECORD_VERSION

    pool: str
    namespace: str
    name: str
    since: float
    version: int = INTENT_RECORD_VERSION

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.pool, self.namespace, self.name)

    @property
    def key(self) -> str:
        return f'{INTENT_PREFIX}{self.pool}/{self.namespace}/{self.name}'


class Intents:
    """Notes import prepares in the KV store for as long as librbd works
    on them; ``sweep`` removes the targets of those a failover cut."""

    def __init__(self, store: 'Store', engine: 'LibrbdEngine') -> None:
        self.store = store
        self.engine = engine

    def held(self, dst: ImageSpec) -> '_Held':
        return _Held(self, Intent(dst.pool, dst.namespace, dst.name, time.time()))

    def pending(self) -> List[Intent]:
        """The notes this code can read; a newer module's are left for it."""
        found = []
        for key, text in self.store.get_store_prefix(INTENT_PREFIX).items():
            try:
                found.append(Intent.from_json(text))
            except NewerRecord as e:
                log.warning('leaving prepare note %s alone: %s', key, e)
            except (TypeError, ValueError):
                log.warning('dropping unreadable prepare note %s', key)
                self.store.set_store(key, None)
        return found

    def sweep(self, before: float, stop: Optional[threading.Event] = None) -> List[str]:
        """Remove the half-made targets of prepares noted before ``before``
        (this mgr's start); returns what it removed."""
        removed = []
        for intent in self.pending():
            if intent.since >= before:
                continue  # this mgr's own, still running
            if self._remove_cut_target(intent, stop):
                removed.append(str(intent.spec))
            self.store.set_store(intent.key, None)
        return removed

    def _remove_cut_target(self, intent: Intent, stop: Optional[threading.Event]) -> bool:
        try:
            with self.engine.ioctx(intent.pool, intent.namespace) as io:
                try:
                    with rbd.Image(io, intent.name, read_only=True) as img:
                        migrating = bool(img.op_features() & OP_FEATURE_MIGRATION)
                        created = img.create_timestamp().timestamp()
                except rbd.ImageNotFound:
                    return False  # librbd's own cleanup ran, or it never got that far
                if migrating or created < intent.since - CLOCK_SKEW:
                    # A whole prepare (its answer lost) or someone else's image.
                    return False
                for _ in _until(WATCH_WAIT, stop):
                    try:
                        with rbd.Image(io, intent.name) as img:
                            self.engine.remove_snapshots(img)
                        self.engine.rbd.remove(io, intent.name)
                        return True
                    except rbd.ImageBusy:
                        continue  # the cut client's watch has not timed out yet
                    except rbd.ImageNotFound:
                        return False
                log.warning('%s: the target of a cut prepare is still watched after '
                            '%.0f s; remove it with rbd rm', intent.spec, WATCH_WAIT)
                return False
        except (rados.Error, rbd.Error) as e:
            log.warning('%s: removing the target of a cut prepare: %s', intent.spec, e)
            return False


def _until(limit: float, stop: Optional[threading.Event], step: float = 5.0) -> Iterator[int]:
    """Attempts, ``step`` apart, until ``limit`` seconds passed or ``stop``
    is set."""
    end = time.monotonic() + limit
    stop = stop or threading.Event()
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        if time.monotonic() >= end or stop.wait(step):
            return


class _Held:
    def __init__(self, intents: Intents, intent: Intent) -> None:
        self.intents = intents
        self.intent = intent

    def __enter__(self) -> Intent:
        self.intents.store.set_store(self.intent.key, self.intent.to_json())
        return self.intent

    def __exit__(self, *exc: object) -> None:
        self.intents.store.set_store(self.intent.key, None)

"""What prepare records of each librbd-path migration, in the KV store.

librbd's import-only migrations leave no trash entry a listing finds, so
the listing starts from these records; they also keep the layout status
shows, the source's validators execute checks the copy against, and why
the source changed under a copy (which holds commit back).  A record a
newer module wrote is read by nothing here and never rewritten or removed:
that module finds it again as it left it.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Set

from .engine.migration import ImageRef
from .records import NewerRecord, Record
from .store import Store
from .validators import Validators

log = logging.getLogger(__name__)

MIGRATION_PREFIX = 'migration/'
#: The layout of the registrations this code writes (the first had no
#: version field and the same fields, ``source_changed`` only once set;
#: 2 added ``view``, which a module that knows only 1 would drop).
REGISTRATION_VERSION = 2


@dataclass
class Registration(Record):
    """One librbd-path migration, under its target's key."""

    KIND: ClassVar[str] = 'migration registration'
    VERSION: ClassVar[int] = REGISTRATION_VERSION

    dest: ImageRef
    #: When prepare ran.
    prepared: float = 0.0
    #: The target's layout options, as status shows them.
    layout: Dict[str, Any] = field(default_factory=dict)
    #: What an import's probe found (None for an in-cluster migration).
    probe: Optional[Dict[str, Any]] = None
    #: What prepare saw of an import's source, checked around the copy.
    validators: Validators = field(default_factory=dict)
    #: Why the source is not the one the copy read ('' while it is).
    source_changed: str = ''
    #: A live import's view, as the endpoint serves it (see live/imports.py):
    #: its token, validators and the source-spec it presents; None for the
    #: migrations librbd reads itself.
    view: Optional[Dict[str, Any]] = None
    version: int = REGISTRATION_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.dest, dict):  # as read from the store
            self.dest = ImageRef(**self.dest)
        if not isinstance(self.dest, ImageRef):
            raise TypeError(f'dest: expected an image, got {type(self.dest).__name__}')


def registration_key(ref: ImageRef) -> str:
    return MIGRATION_PREFIX + ref.key


class Registrations:
    """The registrations in the KV store: unreadable ones read as none (as
    they always did), newer ones as none here and left in place."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: Keys of newer records already warned about (read on every listing).
        self._warned: Set[str] = set()

    def save(self, record: Registration) -> None:
        self.store.set_store(registration_key(record.dest), record.to_json())

    def get(self, ref: ImageRef) -> Optional[Registration]:
        """The target's registration; None when there is none this code can
        read.  Raises NewerRecord for a newer module's."""
        text = self.store.get_store(registration_key(ref))
        return self._parse(registration_key(ref), text, raise_newer=True) if text else None

    def remove(self, ref: ImageRef) -> None:
        """Forget the migration (it ended); a newer module's record stays."""
        try:
            self.get(ref)
        except NewerRecord:
            return
        self.store.set_store(registration_key(ref), None)

    def refs(self) -> List[ImageRef]:
        """The targets of every registration this code can read."""
        found = []
        for key, text in self.store.get_store_prefix(MIGRATION_PREFIX).items():
            record = self._parse(key, text, raise_newer=False)
            if record is not None:
                found.append(record.dest)
        return found

    def _parse(self, key: str, text: str, raise_newer: bool) -> Optional[Registration]:
        try:
            return Registration.from_json(text)
        except NewerRecord as e:
            if key not in self._warned:
                self._warned.add(key)
                log.warning('leaving migration registration %s alone: %s', key, e)
            if raise_newer:
                raise
            return None
        except (ValueError, TypeError):
            return None

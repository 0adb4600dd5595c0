"""Versioned records: what the module keeps as JSON in the mgr's KV store.

Every kind of record carries a ``version``, the layout of the code that
wrote it.  Reading brings an older record up to this code's layout one step
at a time (a record written before the field existed is version 1), and
refuses one a newer module wrote (the mgr was downgraded): rewriting it
would drop what this code does not know, so callers leave it where it is
for the newer module to find again.
"""
import json
from dataclasses import asdict, fields
from typing import Any, Callable, ClassVar, Dict, Mapping, Type, TypeVar, cast

#: Turns a record of one version, in place, into the next version's layout.
Upgrade = Callable[[Dict[str, Any]], None]


class NewerRecord(ValueError):
    """A record a newer module wrote (the mgr was downgraded): kept as it
    is, for the newer module to find again, and left alone here."""


def upgrade(data: Any, kind: str, version: int,
            steps: Mapping[int, Upgrade]) -> Dict[str, Any]:
    """A copy of ``data`` in the layout of ``version``; ``steps[n]`` brings
    a version ``n`` record to version ``n + 1`` (none: nothing to change)."""
    if not isinstance(data, dict):
        raise ValueError(f'expected a JSON object, got {type(data).__name__}')
    data = dict(data)
    found = data.get('version', 1)
    if not isinstance(found, int) or found < 1:
        raise ValueError(f'{kind} record version {found!r} is not a version')
    if found > version:
        raise NewerRecord(f'{kind} record version {found} is newer than this module '
                          f'knows ({version})')
    for step in range(found, version):
        if step in steps:
            steps[step](data)
        data['version'] = step + 1
    return data


R = TypeVar('R', bound='Record')


class Record:
    """A dataclass kept as one JSON object: each record's class names its
    kind and current version, declares ``version: int = VERSION`` as its
    last field, and lists the steps from older versions."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int]
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {}

    def stored(self) -> Dict[str, Any]:
        """What is written: every field."""
        return asdict(cast(Any, self))

    def to_json(self) -> str:
        return json.dumps(self.stored())

    @classmethod
    def from_dict(cls: Type[R], data: Any) -> R:
        """A stored record, upgraded; fields this code does not know (from a
        newer minor change) are dropped, missing ones get their defaults."""
        data = upgrade(data, cls.KIND, cls.VERSION, cls.UPGRADES)
        known = {f.name for f in fields(cast(Any, cls))}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls: Type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))

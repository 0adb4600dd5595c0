"""The versioning shared by every record the module keeps: older records
are brought up one step at a time, newer ones are refused, and the
caller's data is never changed."""
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping

import pytest

from rbd_migration.records import NewerRecord, Record, Upgrade, upgrade


def _renamed(data: Dict[str, Any]) -> None:
    data['name'] = data.pop('title', '')


def _counted(data: Dict[str, Any]) -> None:
    data.setdefault('count', 1)


@dataclass
class Note(Record):
    KIND: ClassVar[str] = 'note'
    VERSION: ClassVar[int] = 3
    UPGRADES: ClassVar[Mapping[int, Upgrade]] = {1: _renamed, 2: _counted}

    name: str
    count: int = 0
    version: int = 3


def test_a_record_without_a_version_is_version_1_and_goes_up_step_by_step() -> None:
    note = Note.from_json('{"title": "a"}')
    assert (note.name, note.count, note.version) == ('a', 1, 3)
    assert json.loads(note.to_json()) == {'name': 'a', 'count': 1, 'version': 3}


def test_a_middle_version_takes_only_the_steps_after_it() -> None:
    assert Note.from_json('{"name": "b", "version": 2}').count == 1
    assert Note.from_json('{"name": "b", "count": 5, "version": 3}').count == 5


def test_fields_this_code_does_not_know_are_dropped() -> None:
    assert Note.from_json('{"name": "c", "colour": "red", "version": 3}').name == 'c'


def test_a_newer_record_is_refused_and_what_is_not_a_record_is_unreadable() -> None:
    with pytest.raises(NewerRecord, match='note record version 4 is newer than this '
                                          r'module knows \(3\)'):
        Note.from_json('{"name": "d", "version": 4}')
    for text in ('[1]', '{"name": "e", "version": "2"}', '{"name": "e", "version": 0}'):
        with pytest.raises(ValueError):
            Note.from_json(text)


def test_upgrading_leaves_the_callers_data_as_it_was() -> None:
    data = {'title': 'f'}
    assert upgrade(data, 'note', 3, Note.UPGRADES) == {'name': 'f', 'count': 1, 'version': 3}
    assert data == {'title': 'f'}

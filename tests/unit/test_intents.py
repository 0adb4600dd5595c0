"""Prepare notes in the KV store: the note today's module writes loads;
one from a newer module is neither swept nor dropped."""
import json
from typing import cast

from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.images import ImageSpec
from rbd_migration.intents import INTENT_PREFIX, INTENT_RECORD_VERSION, Intent, Intents

from tests.queueharness import MemStore

#: As the module writes it (its notes carried version 1 from the start).
NOTE = '{"version": 1, "pool": "rbd", "namespace": "", "name": "img", "since": 5.0}'


def test_todays_note_loads_and_a_held_note_is_written_the_same_way() -> None:
    note = Intent.from_json(NOTE)
    assert (note.spec, note.since, note.version) == (ImageSpec('rbd', '', 'img'), 5.0, 1)
    store = MemStore()
    intents = Intents(store, cast(LibrbdEngine, None))
    with intents.held(ImageSpec('rbd', 'ns', 'x')) as held:
        written = json.loads(store.data[held.key])
        assert written == dict(version=INTENT_RECORD_VERSION, pool='rbd', namespace='ns',
                               name='x', since=held.since)
        assert intents.pending() == [held]
    assert store.data == {}


def test_a_newer_note_is_left_alone() -> None:
    store = MemStore()
    newer = json.dumps(dict(json.loads(NOTE), version=INTENT_RECORD_VERSION + 1))
    store.set_store(f'{INTENT_PREFIX}rbd//img', newer)
    store.set_store(f'{INTENT_PREFIX}rbd//bad', '{"pool": 1}')
    intents = Intents(store, cast(LibrbdEngine, None))
    assert intents.sweep(before=1e12) == []
    assert store.data == {f'{INTENT_PREFIX}rbd//img': newer}

"""The adapter engine's import records: the record today's module writes
(no version) loads as a typed record and is written back versioned; one
from a newer module is left alone, and keeps the orphan sweep off every
image (its target is unknown here)."""
import json
from typing import Any, cast

import pytest

from rbd_migration.engine.adapter import (ADAPTER_RECORD_VERSION, RECORD_PREFIX,
                                          AdapterEngine, ImportRecord)
from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.engine.migration import ImageRef
from rbd_migration.errors import NotFound, Unsupported
from rbd_migration.images import ImageSpec

from tests.queueharness import MemStore

#: As the module wrote it before records carried a version.
RECORD = ('{"dest": {"pool_id": 2, "pool": "rbd2", "namespace": "", "name": "img", '
          '"id": "abc"}, "spec": {"type": "raw", "stream": {"type": "file", '
          '"file_path": "/srv/img.raw"}}, "state": "executed", "created": 1.5, '
          '"private_name": "rbd_migration.0123456789ab", "validators": {}, "error": "", '
          '"stats": {"bytes_read": 8, "bytes_written": 8, "bytes_zeroed": 0, '
          '"bytes_skipped": 0}}')
#: Prepared and not yet executed: no error, no stats.
PREPARED = ('{"dest": {"pool_id": 2, "pool": "rbd2", "namespace": "ns", "name": "new", '
            '"id": "def"}, "spec": {"type": "raw"}, "state": "prepared", "created": 2.0, '
            '"private_name": "rbd_migration.ba9876543210", "validators": {}}')
REF = ImageRef(2, 'rbd2', '', 'img', 'abc')


def _engine(**records: str) -> AdapterEngine:
    store = MemStore()
    for text in records.values():
        store.set_store(RECORD_PREFIX + ImageRef(**json.loads(text)['dest']).key, text)
    # Reading records needs no cluster: a librbd call would fail on None.
    return AdapterEngine(cast(LibrbdEngine, None), store)


def test_todays_unversioned_records_load_typed_and_are_written_back_versioned() -> None:
    record = ImportRecord.from_json(RECORD)
    assert record.dest == REF and record.stats == {'bytes_read': 8, 'bytes_written': 8,
                                                   'bytes_zeroed': 0, 'bytes_skipped': 0}
    assert json.loads(record.to_json()) == dict(json.loads(RECORD), version=ADAPTER_RECORD_VERSION)
    prepared = ImportRecord.from_json(PREPARED)
    assert (prepared.state, prepared.error, prepared.stats) == ('prepared', '', None)


def test_the_engine_lists_finds_and_notes_failures_in_todays_records() -> None:
    engine = _engine(a=RECORD, b=PREPARED)
    assert sorted(i.dest.name for i in engine.list()) == ['img', 'new']
    info = engine.find(ImageSpec('rbd2', 'ns', 'new'))
    assert info is not None and (info.state, info.path) == ('prepared', 'adapter')
    assert engine.source_spec(REF) == {'type': 'raw', 'stream': {'type': 'file',
                                                                 'file_path': '/srv/img.raw'}}
    engine.fail(REF, 'source gone')
    text = cast(Any, engine.store).data[RECORD_PREFIX + REF.key]
    assert json.loads(text)['error'] == 'source gone'
    failed = engine.find(ImageSpec('rbd2', '', 'img'))
    assert failed is not None and failed.state_description == 'source gone'
    with pytest.raises(NotFound, match='is not an import in progress'):
        engine.source_spec(ImageRef(2, 'rbd2', '', 'x', 'zzz'))


def test_a_newer_record_is_left_alone_and_stops_the_orphan_sweep() -> None:
    newer = json.dumps(dict(json.loads(RECORD), version=ADAPTER_RECORD_VERSION + 1))
    engine = _engine(a=newer, b=PREPARED)
    assert [i.dest.name for i in engine.list()] == ['new']
    with pytest.raises(Unsupported, match='a newer rbd_migration module must finish'):
        engine.source_spec(REF)
    assert engine.sweep_orphans(before=1e12) == []
    assert cast(Any, engine.store).data[RECORD_PREFIX + REF.key] == newer

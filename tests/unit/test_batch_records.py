"""Batch records in the KV store: the header and item records today's
module writes (no version) load and are written back versioned; a batch
with a record from a newer module is left alone whole."""
import json

from rbd_migration.batch import (BATCH_PREFIX, BATCH_RECORD_VERSION, EXECUTING,
                                 ITEM_RECORD_VERSION, Batch, BatchBook, BatchItem)

from tests.queueharness import MemStore

#: As the module wrote them before records carried a version.
HEADER = ('{"id": "b1", "source_pool": "rbd", "source_namespace": "", "dest_pool": "rbd2", '
          '"dest_namespace": "ns", "layout": {"data_pool": null}, "auto_commit": true, '
          '"verify": false, "created": 100.0, "finished": null, "cancelled": false, '
          '"acknowledged": false}')
ITEM = ('{"index": 0, "name": "a", "size": 1024, "snapshots": 1, "parent": null, '
        '"parent_item": null, "clones": 0, "state": "executing", "reason": null, '
        '"retrying": false, "task_id": "3", "key": "2/ns/abc", "started": 101.0, '
        '"finished": null}')
ITEM_BEFORE_RETRYING = ('{"index": 1, "name": "b", "size": 1, "snapshots": 0, '
                        '"state": "pending", "reason": "retrying: prepare b: timed out"}')


def _store(**records: str) -> MemStore:
    store = MemStore()
    for key, text in records.items():
        store.set_store(BATCH_PREFIX + key.replace('_', '/'), text)
    return store


def test_todays_unversioned_records_load_and_are_written_back_versioned() -> None:
    store = _store(b1=HEADER, b1_000000=ITEM, b1_000001=ITEM_BEFORE_RETRYING)
    book = BatchBook(store)
    book.load()
    batch = book.get('b1')
    assert (batch.dest, batch.auto_commit, batch.layout) == ('rbd2/ns', True, {'data_pool': None})
    first, second = batch.items
    assert (first.state, first.task_id, first.key) == (EXECUTING, '3', '2/ns/abc')
    assert second.retrying and second.version == ITEM_RECORD_VERSION
    book.save(batch)
    book.save_item(batch, first)
    header = json.loads(store.data[BATCH_PREFIX + 'b1'])
    assert header == dict(json.loads(HEADER), version=BATCH_RECORD_VERSION)
    item = json.loads(store.data[BATCH_PREFIX + 'b1/000000'])
    assert item == dict(json.loads(ITEM), version=ITEM_RECORD_VERSION)


def test_status_shows_no_version() -> None:
    batch = Batch.from_json(HEADER)
    batch.items = [BatchItem.from_json(ITEM)]
    assert 'version' not in batch.summary(0.5)
    assert batch.items[0].to_dict() == dict(json.loads(ITEM), state=EXECUTING)


def test_a_batch_with_a_newer_record_is_left_alone_whole() -> None:
    newer_item = json.dumps(dict(json.loads(ITEM), version=ITEM_RECORD_VERSION + 1))
    newer_header = json.dumps(dict(json.loads(HEADER), id='b2',
                                   version=BATCH_RECORD_VERSION + 1))
    store = _store(b1=HEADER, b1_000000=newer_item, b2=newer_header, b2_000000=ITEM,
                   b3=json.dumps(dict(json.loads(HEADER), id='b3')), b3_000000='{not json')
    book = BatchBook(store)
    book.load()
    assert [b.id for b in book.list()] == ['b3']
    assert store.data[BATCH_PREFIX + 'b1/000000'] == newer_item
    assert store.data[BATCH_PREFIX + 'b2'] == newer_header
    assert BATCH_PREFIX + 'b3/000000' not in store.data   # unreadable: dropped

"""Migration registrations: what prepare records of a librbd-path
migration.  The records today's module writes (no version) load typed and
are written back versioned under the same key; a source that changes under
a copy is noted and holds commit back; a newer module's record is read by
nothing, refused for the actions that go by it, and never rewritten or
removed."""
import json
from pathlib import Path
from typing import Any, Dict, Optional, cast

import pytest
import rados

from rbd_migration.engine.migration import ImageRef, MigrationInfo
from rbd_migration.errors import SourceChanged, Unsupported
from rbd_migration.records import NewerRecord
from rbd_migration.registrations import (MIGRATION_PREFIX, REGISTRATION_VERSION, Registration,
                                         Registrations)
from rbd_migration.service import MigrationService
from rbd_migration.tasks import Task, TaskAction

from tests.queueharness import MemStore, Recorder

#: As the module wrote them before records carried a version: an in-cluster
#: migration, and an import whose source changed under its copy.
MIGRATION = ('{"dest": {"pool_id": 2, "pool": "rbd2", "namespace": "", "name": "img", '
             '"id": "abc"}, "prepared": 1.5, "layout": {"data_pool": "ec"}, "probe": null, '
             '"validators": {}}')
IMPORT = ('{"dest": {"pool_id": 2, "pool": "rbd2", "namespace": "ns", "name": "new", '
          '"id": "def"}, "prepared": 2.5, "layout": {}, "probe": {"format": "raw"}, '
          '"validators": {"stream": {"size": "8"}}, "source_changed": "stream: size"}')
REF = ImageRef(2, 'rbd2', '', 'img', 'abc')
KEY = MIGRATION_PREFIX + '2//abc'


def _newer(text: str) -> str:
    return json.dumps(dict(json.loads(text), version=REGISTRATION_VERSION + 1))


def _store(**records: str) -> MemStore:
    store = MemStore()
    for text in records.values():
        key = MIGRATION_PREFIX + ImageRef(**json.loads(text)['dest']).key
        store.set_store(key, text)
    return store


def test_todays_unversioned_records_load_typed_and_are_written_back_versioned() -> None:
    record = Registration.from_json(MIGRATION)
    assert (record.dest, record.layout, record.probe, record.source_changed) == (
        REF, {'data_pool': 'ec'}, None, '')
    assert json.loads(record.to_json()) == dict(json.loads(MIGRATION), source_changed='',
                                                view=None, version=REGISTRATION_VERSION)
    changed = Registration.from_json(IMPORT)
    assert (changed.validators, changed.source_changed) == ({'stream': {'size': '8'}},
                                                            'stream: size')
    assert json.loads(changed.to_json()) == dict(json.loads(IMPORT), view=None,
                                                 version=REGISTRATION_VERSION)


def test_the_key_layout_is_the_targets_key_under_the_prefix() -> None:
    store = MemStore()
    Registrations(store).save(Registration.from_json(MIGRATION))
    assert list(store.data) == [KEY]


def test_unreadable_records_read_as_none_and_are_removed_when_the_migration_ends() -> None:
    store = _store(a=MIGRATION)
    store.set_store(MIGRATION_PREFIX + '2//bad', '{not json')
    store.set_store(MIGRATION_PREFIX + '2//nodest', '{"prepared": 1.0}')
    store.set_store(MIGRATION_PREFIX + '2//str', '{"dest": "rbd2/img"}')
    registrations = Registrations(store)
    assert registrations.refs() == [REF]
    bad = ImageRef(2, 'rbd2', '', 'x', 'bad')
    assert registrations.get(bad) is None
    registrations.remove(bad)
    registrations.remove(REF)
    assert sorted(store.data) == [MIGRATION_PREFIX + '2//nodest', MIGRATION_PREFIX + '2//str']


def test_a_newer_record_is_read_by_nothing_and_never_removed() -> None:
    newer = _newer(MIGRATION)
    store = _store(a=newer, b=IMPORT)
    registrations = Registrations(store)
    assert [r.name for r in registrations.refs()] == ['new']
    with pytest.raises(NewerRecord):
        registrations.get(REF)
    registrations.remove(REF)
    assert store.data[KEY] == newer


# -- through the service -------------------------------------------------------

def _service(store: MemStore, roots: str = '') -> MigrationService:
    """A service whose commands need no cluster for what these tests do."""
    options = {'file_source_roots': roots}
    return MigrationService(cast(rados.Rados, None), store, Recorder(), options.get)


def _execute_task(ref: ImageRef) -> Task:
    return Task(id='1', action=TaskAction.EXECUTE, pool_id=ref.pool_id, pool=ref.pool,
                namespace=ref.namespace, image_id=ref.id, image_name=ref.name,
                sequence=1, message='')


class _Engine:
    """librbd's side of an execute: the source-spec it reads, and a copy
    that runs ``during`` while it copies."""

    rados = None

    def __init__(self, spec: Dict[str, Any], during: Any = lambda: None) -> None:
        self.spec, self.during, self.executed = spec, during, 0

    def status(self, spec: Any) -> Optional[MigrationInfo]:
        return None

    def verify_source_spec(self, info: Any) -> Dict[str, Any]:
        return self.spec

    def execute(self, ref: ImageRef, progress: Any) -> None:
        self.executed += 1
        self.during()


def _import(tmp_path: Path, changed: str = '') -> Registration:
    """A registration of an import of a file under ``tmp_path``, its
    validators read from the file as prepare reads them."""
    image = tmp_path / 'img.raw'
    image.write_bytes(b'\0' * 8)
    st = image.stat()
    return Registration(dest=REF, prepared=1.0, validators={'stream': {
        'size': '8', 'mtime_ns': str(st.st_mtime_ns), 'ino': str(st.st_ino)}},
        source_changed=changed)


def test_a_source_changed_under_the_copy_is_noted_and_holds_commit_back(
        tmp_path: Path) -> None:
    store = MemStore()
    service = _service(store, str(tmp_path))
    recorded = _import(tmp_path)
    service.registrations.save(recorded)
    image = tmp_path / 'img.raw'
    spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': str(image)}}
    engine = _Engine(spec, during=lambda: image.write_bytes(b'\1' * 16))
    service.engine = service.bulk = cast(Any, engine)
    with pytest.raises(SourceChanged, match='during the copy'):
        service._execute_librbd(_execute_task(REF), REF, lambda done, total: 0)
    noted = Registration.from_json(store.data[KEY])
    assert noted.source_changed.startswith("source-spec: stream: size '8' -> '16'")
    assert (noted.validators, noted.version) == (recorded.validators, REGISTRATION_VERSION)
    cast(Any, service).find = lambda image: MigrationInfo(REF, 'executed', '')
    with pytest.raises(SourceChanged, match=r"^cannot commit rbd2/img: source-spec: stream"):
        service.commit('rbd2/img')


def test_status_shows_the_layout_prepare_recorded() -> None:
    service = _service(_store(a=MIGRATION))
    assert service.layout_of(REF) == {'data_pool': 'ec'}
    assert service.layout_of(ImageRef(2, 'rbd2', '', 'x', 'none')) == {}


def test_a_newer_record_refuses_execute_and_commit_and_stays_as_it_was(
        tmp_path: Path) -> None:
    newer = _newer(MIGRATION)
    store = _store(a=newer)
    service = _service(store, str(tmp_path))
    engine = _Engine({})
    service.engine = service.bulk = cast(Any, engine)
    with pytest.raises(Unsupported, match=r'^cannot execute rbd2/img: migration registration '
                                          f'record version {REGISTRATION_VERSION + 1} is '
                                          'newer than this module '
                                          rf'knows \({REGISTRATION_VERSION}\); a newer '
                                          'rbd_migration module'):
        service._execute_librbd(_execute_task(REF), REF, lambda done, total: 0)
    assert engine.executed == 0
    cast(Any, service).find = lambda image: MigrationInfo(REF, 'executed', '')
    with pytest.raises(Unsupported, match='^cannot commit rbd2/img: '):
        service.commit('rbd2/img')
    assert service.layout_of(REF) == {}
    assert service._registered() == []
    service._unregister(REF)
    assert store.data == {KEY: newer}

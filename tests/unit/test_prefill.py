"""The module's copy of a live import (engine/prefill.py), without a cluster:
the copy-up's input as cls_rbd decodes it, one copy-up per object with all
of its data (a second one would be ignored by the OSD), which targets it
takes, and progress shared with librbd's walk.  tests/cluster/test_live.py
runs it against real OSDs and a client holding the image's lock."""
import json
import struct
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from rbd_migration.engine.copier import Checkpoint, CopyOptions, _planned
from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.engine.migration import ImageRef
from rbd_migration.context import SourceContext
from rbd_migration.engine.prefill import (LiveExecute, ObjectFill, ObjectLayout, reason_not,
                                          sparse_copyup_input, within)
from rbd_migration.errors import PermissionDenied
from rbd_migration.formats.base import Extent, ExtentKind, Format, Snapshot
from rbd_migration.limits import SourceLimits

MiB = 1 << 20
KiB = 1 << 10


def _decode(payload: bytes) -> Tuple[List[Tuple[int, int]], bytes]:
    """cls_rbd's decoding: map<u64,u64> (u32 count), then a bufferlist."""
    (count,) = struct.unpack_from('<I', payload)
    pairs = [struct.unpack_from('<QQ', payload, 4 + 16 * i) for i in range(count)]
    at = 4 + 16 * count
    (length,) = struct.unpack_from('<I', payload, at)
    data = payload[at + 4:]
    assert len(data) == length
    return [(int(a), int(b)) for a, b in pairs], data


def test_sparse_copyup_input_is_what_cls_rbd_decodes() -> None:
    payload = sparse_copyup_input([(0, b'a' * 10), (4096, b'b' * 3)])
    assert _decode(payload) == ([(0, 10), (4096, 3)], b'a' * 10 + b'b' * 3)
    assert _decode(sparse_copyup_input([])) == ([], b'')


def _layout(**kw: Any) -> ObjectLayout:
    base: Dict[str, Any] = dict(data_pool_id=1, namespace='', prefix='rbd_data.abc',
                                object_size=4 * MiB, size=64 * MiB, stripe_unit=4 * MiB,
                                stripe_count=1, snapshots=0)
    base.update(kw)
    return ObjectLayout(**base)


class Scattered(Format):
    """64 MiB, data in pieces further apart than the copier's merge gap,
    two of them in the first object and one across objects 2 and 3."""

    PIECES = [(0, 64 * KiB), (2 * MiB, 64 * KiB), (12 * MiB - 4 * KiB, 8 * KiB),
              (40 * MiB, 1 * MiB)]

    def __init__(self, snaps: Optional[List[Snapshot]] = None) -> None:
        self.snaps = snaps or []
        self.image = bytearray(64 * MiB)
        for n, (off, length) in enumerate(self.PIECES):
            self.image[off:off + length] = bytes([n + 1]) * length

    @classmethod
    def from_spec(cls, spec: Any, ctx: Any) -> 'Scattered':
        return cls()

    def size(self, snap: Optional[Snapshot] = None) -> int:
        return len(self.image)

    def snapshots(self) -> List[Snapshot]:
        return self.snaps

    def extents(self, snap: Optional[Snapshot] = None) -> Iterator[Extent]:
        for off, length in self.PIECES:
            yield Extent(off, length)

    def read(self, offset: int, length: int, snap: Optional[Snapshot] = None) -> bytes:
        return bytes(self.image[offset:offset + length])


class Completion:
    def get_return_value(self) -> int:
        return 0


class Objects:
    """A pool's ioctx as the copy-up uses it: an object is written by its
    first copy-up only, as cls_rbd does."""

    def __init__(self) -> None:
        self.objects: Dict[str, bytearray] = {}
        self.calls: List[str] = []
        self.lock = threading.Lock()

    def aio_execute(self, name: str, cls: str, method: str, data: bytes, length: int,
                    oncomplete: Callable[[Completion, bytes], None]) -> None:
        assert (cls, method, length) == ('rbd', 'sparse_copyup', 0)
        extents, payload = _decode(data)
        with self.lock:
            self.calls.append(name)
            if name not in self.objects:
                obj = self.objects[name] = bytearray(4 * MiB)
                at = 0
                for off, n in extents:
                    obj[off:off + n] = payload[at:at + n]
                    at += n
        oncomplete(Completion(), b'')


@pytest.mark.parametrize('window', [1, 8])
def test_each_object_gets_one_copyup_with_all_of_its_data(window: int) -> None:
    fmt, io = Scattered(), Objects()
    options = CopyOptions(window=window).fitted(4 * MiB, 0)
    ObjectFill(fmt, _layout(), io, options, lambda done, total: True).run(Checkpoint())
    assert sorted(io.calls) == sorted(set(io.calls)), 'an object was copied up twice'
    assert sorted(io.calls) == [f'rbd_data.abc.{n:016x}' for n in (0, 2, 3, 10)]
    image = bytearray(64 * MiB)
    for name, data in io.objects.items():
        number = int(name.rsplit('.', 1)[1], 16)
        image[number * 4 * MiB:(number + 1) * 4 * MiB] = data
    assert image == fmt.image


def test_a_fresh_chunk_is_fused_whole_for_a_target_written_a_chunk_at_a_time() -> None:
    exts = [Extent(0, 4096), Extent(2 * MiB, 4096), Extent(4 * MiB + 64 * KiB, 4096)]
    got = [(e.offset, e.length) for e in _planned(iter(exts), 4 * MiB, 1, True, whole=True)]
    assert got == [(0, 2 * MiB + 4096), (4 * MiB + 64 * KiB, 4096)]


def test_which_targets_the_module_fills() -> None:
    fmt = Scattered()
    assert reason_not(fmt, _layout()) is None
    with_snapshot = Scattered([Snapshot('s1', 64 * MiB)])
    assert reason_not(with_snapshot, _layout()) == 'the source has snapshots'
    assert reason_not(fmt, _layout(snapshots=1)) == 'the target has snapshots'
    assert reason_not(fmt, _layout(size=32 * MiB)) == 'the target was resized'
    assert reason_not(fmt, _layout(stripe_unit=64 * KiB, stripe_count=8)) == \
        'the target is striped'


def test_progress_of_two_parts_never_goes_back() -> None:
    seen: List[float] = []

    def progress(done: int, total: int) -> int:
        seen.append(done / total)
        return 0
    fill, rest = within(progress, 0.0, 0.9), within(progress, 0.9, 1.0)
    for done in (0, 50, 100):
        fill(done, 100)
    for done in (0, 1, 2, 2):
        rest(done, 2)
    assert seen == sorted(seen)
    assert seen[0] == 0.0 and seen[2] == pytest.approx(0.9) and seen[-1] == 1.0
    assert within(lambda d, t: 7, 0.0, 1.0)(1, 2) == 7   # a cancel gets through


class KeyedClient:
    """What a child's rados client answers to ``config-key get``."""

    def __init__(self, keys: Dict[str, str]) -> None:
        self.keys = keys

    def mon_command(self, cmd: str, inbuf: bytes, timeout: float = 0) -> Tuple[int, bytes, str]:
        key = json.loads(cmd)['key']
        return (0, self.keys[key].encode(), '') if key in self.keys else (-2, b'', 'no key')


def test_a_live_execute_is_rebuilt_in_the_child_as_the_mgr_made_it() -> None:
    """The child reads the source under the mgr's rules: the same roots,
    redirect origins, limits, request bounds and config-key prefixes."""
    live = LiveExecute(
        spec={'type': 'vmdk', 'stream': {'type': 'file', 'file_path': '/srv/d.vmdk'}},
        why_not='', key_prefixes=['rbd/'],
        context=SourceContext(allowed_file_roots=['/srv'], redirect_origins=['https://a:1'],
                              limits=SourceLimits(snapshots=7), remote_conf_dir='/etc/x',
                              timeout=3.0, retries=2, stop=threading.Event()),
        options=CopyOptions(window=3, bandwidth=5e6), resume_fast_diff=True)
    client = KeyedClient({'rbd/s3/secret': 'sekrit', 'mgr/rbd_migration/task/1': '{}'})
    again = LiveExecute.rebuilt(json.loads(json.dumps(live.portable())), client)
    assert (again.spec, again.why_not, again.key_prefixes, again.options,
            again.resume_fast_diff) == (live.spec, live.why_not, live.key_prefixes,
                                        live.options, live.resume_fast_diff)
    ctx = again.context
    assert (ctx.allowed_file_roots, ctx.redirect_origins, ctx.limits, ctx.remote_conf_dir,
            ctx.timeout, ctx.retries) == (['/srv'], ['https://a:1'], SourceLimits(snapshots=7),
                                          '/etc/x', 3.0, 2)
    assert ctx.rados is client and ctx.stop is None and ctx.deadline is None
    assert ctx.config_key is not None
    assert ctx.config_key('rbd/s3/secret') == 'sekrit'
    assert ctx.config_key('rbd/none') is None
    with pytest.raises(PermissionDenied, match="config-key 'mgr/rbd_migration/task/1' is not one"):
        ctx.config_key('mgr/rbd_migration/task/1')


class StepEngine(LibrbdEngine):
    """A LibrbdEngine whose cluster steps are recorded, not run."""

    def __init__(self) -> None:
        super().__init__(None)
        self.steps: List[str] = []

    def rebuild_object_maps(self, dst: ImageRef, enable_fast_diff: bool = False) -> None:
        self.steps.append('rebuild')

    def record_executed(self, dst: ImageRef, invalidate_maps: bool = False) -> None:
        self.steps.append('maps invalid, executed' if invalidate_maps else 'executed')

    def execute(self, dst: ImageRef, progress: Callable[[int, int], int]) -> None:
        self.steps.append('librbd execute')

    def resume_fast_diff(self, dst: ImageRef) -> None:
        self.steps.append('fast-diff')


@pytest.mark.parametrize('copied, resume, steps', [
    (True, True, ['maps invalid, executed', 'fast-diff']),
    (True, False, ['maps invalid, executed', 'rebuild']),
    (False, True, ['librbd execute', 'fast-diff']),
    (False, False, ['librbd execute']),
])
def test_a_whole_copy_is_recorded_executed_with_its_maps_flagged_then_rebuilt_once(
        copied: bool, resume: bool, steps: List[str]) -> None:
    """The maps are flagged invalid no later than the state says executed
    (a commit right after must not trust a map without the copied
    objects), then rebuilt once: by fast-diff's turning on again where
    prepare turned it off (once nothing reads the source), else on their
    own; librbd's execute only where it copies."""
    engine = StepEngine()
    seen: List[Tuple[int, int]] = []

    def progress(done: int, total: int) -> int:
        seen.append((done, total))
        return 0
    ref = ImageRef(pool_id=1, namespace='', id='abc', name='x', pool='rbd')
    engine.execute_live(ref, progress, copied, resume)
    assert engine.steps == steps
    assert seen == ([(1, 1)] if copied else [])

#!/usr/bin/python3
"""Live import bench: how soon, how fast and how steadily clients read a
compressed qcow2 import that the mgr serves as a plain qcow2 view.

    qa/bench/live_bench.py [--dir DIR] [--osd-size 8G] [--osds 3]
                           [--data 384M] [--reads 2000] [--repeat 3]
                           [--only first-read,reads,copy,failover]

Starts its own cluster in DIR (removed first, stopped at the end), writes
two sparse raw disks, 10 GiB and 1 GiB virtual, each holding --data of
compressible text (4 KiB blocks of repeated text naming their offset) in
4 MiB extents at scattered offsets, the first at offset 0, compresses them
with ``qemu-img convert -c`` and serves the qcow2 files by nginx.

Rows:
  first-read  ``ceph rbd migration prepare --import-only`` of each file over
              HTTP: the command's duration, then the time from its return to
              the first successful client read (python-rbd open, 4 KiB at 0
              and 4 KiB at a data offset, both checked).  Virtual size should
              not matter: the view's tables are built when read.
  reads       --reads random 4 KiB reads of data blocks, one after another,
              each timed with time.perf_counter: on an ``rbd import`` of the
              raw disk, on the live target before execute, and on the live
              target while its execute runs (only reads that ended before
              the task did are counted; targets are prepared and executed
              again until --reads such reads are in, ten at most).
  copy        execute time of the live path and of the hidden path
              (``"rbd_migration": {"live": false}``), from sending execute to
              the end the task records, best of --repeat runs of each taken
              in turn, against ``qemu-img convert`` of the
              same qcow2 file to a local raw file; ``rbd du`` USED of both
              committed targets against ``rbd import`` of the raw disk.  Both
              targets' data extents are read back and checked.
  failover    a reader on a live target (random 4 KiB data blocks every
              10 ms, each read timed and checked) while the bench runs
              ``ceph mgr fail x`` and waits for the module to answer again;
              the longest read, errors (target: none) and reads done, per
              --repeat round.
Prints, asserts nothing; the exit status is 1 when a read failed or
returned other data than the source's.
"""
import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from qa.bench.import_bench import (Bench, BenchError, human, log,  # noqa: E402
                                   run)
from qa.cluster import Cluster, PACKAGES, missing_packages, parse_size  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * KiB
EXTENT = 4 * MiB
POOL = 'rbd'
DEFAULT_DIR = '/tmp/rbd-migration-live-bench'
ROWS = ('first-read', 'reads', 'copy', 'failover')
SIZES = (10 * GiB, 1 * GiB)
#: How long a first read may keep failing before the row reports it.
FIRST_READ_LIMIT = 60.0
#: The failover reader's pause between reads, and how long it reads
#: before the failover and after the module answers again.
FAILOVER_PAUSE = 0.01
FAILOVER_BEFORE = 2.0
FAILOVER_AFTER = 5.0

_TEXT = (b'The quick brown fox jumps over the lazy dog; pack my box with five '
         b'dozen liquor jugs. ')


def block_data(offset: int) -> bytes:
    """The 4 KiB a data block holds: repeated text naming its offset, so
    that it compresses and a read of the wrong block is seen."""
    head = b'block %016x ' % offset
    body = head + _TEXT * (BLOCK // len(_TEXT) + 1)
    return body[:BLOCK]


# --------------------------------------------------------------------------
# The disks


@dataclass
class Disk:
    """One source: the raw disk, its compressed qcow2 and where it is served."""

    size: int
    raw: str
    qcow2: str
    url: str
    extents: List[int]          # offsets of the 4 MiB data extents
    file_size: int = 0

    def spec(self, live: bool = True) -> Dict[str, Any]:
        out: Dict[str, Any] = {'type': 'qcow', 'stream': {'type': 'http', 'url': self.url}}
        if not live:
            out['rbd_migration'] = {'live': False}
        return out

    def data_offset(self) -> int:
        """A data block away from the start: the middle extent's."""
        return self.extents[len(self.extents) // 2] + EXTENT // 2

    def random_blocks(self, rng: random.Random, count: int) -> List[int]:
        return [rng.choice(self.extents) + rng.randrange(EXTENT // BLOCK) * BLOCK
                for _ in range(count)]


def write_disk(path: str, size: int, data: int, rng: random.Random) -> List[int]:
    """A sparse raw file of ``size`` with ``data`` bytes of text blocks in
    4 MiB extents at scattered offsets, the first at 0."""
    slots = size // EXTENT
    count = max(1, data // EXTENT)
    extents = sorted({0, *(s * EXTENT for s in rng.sample(range(1, slots), count - 1))})
    with open(path, 'wb') as f:
        f.truncate(size)
        for at in extents:
            f.seek(at)
            f.write(b''.join(block_data(at + i) for i in range(0, EXTENT, BLOCK)))
    return extents


def make_disk(work: str, www: str, url: str, size: int, data: int) -> Disk:
    rng = random.Random(size)
    tag = f'{size // GiB}g'
    raw = os.path.join(work, f'disk-{tag}.raw')
    qcow2 = os.path.join(www, f'disk-{tag}.qcow2')
    extents = write_disk(raw, size, data, rng)
    t = time.monotonic()
    run(['qemu-img', 'convert', '-c', '-O', 'qcow2', raw, qcow2], timeout=1800)
    disk = Disk(size, raw, qcow2, f'{url}/{os.path.basename(qcow2)}', extents,
                os.path.getsize(qcow2))
    log(f'{os.path.basename(qcow2)}: {human(size)} virtual, {len(extents)} extents of '
        f'4 MiB, file {human(disk.file_size)}, compressed in {time.monotonic() - t:.1f}s')
    return disk


# --------------------------------------------------------------------------
# Reads


@dataclass
class Reads:
    """What a reader of 4 KiB blocks saw."""

    latencies: List[float] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    mismatches: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def read(self, img: Any, offset: int) -> float:
        at = time.monotonic() - self.started
        began = time.perf_counter()
        try:
            data = img.read(offset, BLOCK)
        except Exception as e:  # noqa: BLE001 - every failure is a result here
            self.errors.append(f'{offset:#x}: {e} (read from {at:.2f}s)')
            data = None
        took = time.perf_counter() - began
        self.latencies.append(took)
        if data is not None and data != block_data(offset):
            self.mismatches.append(f'{offset:#x}: {describe(data, block_data(offset))} '
                                   f'(read from {at:.2f}s for {took:.2f}s)')
        return took

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.mismatches)


def describe(got: bytes, want: bytes) -> str:
    """What a wrong read returned, in a few words."""
    if len(got) != len(want):
        return f'{len(got)} bytes, not {len(want)}'
    if not got.strip(b'\0'):
        return 'zeros'
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return f'differs from byte {first}: {got[first:first + 24]!r}'


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(seconds: Optional[float]) -> str:
    return '-' if seconds is None else f'{seconds * 1000:.1f}'


# --------------------------------------------------------------------------
# The bench


class LiveBench:
    def __init__(self, cluster: Cluster, bench: Bench, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.bench = bench
        self.args = args
        self.ioctx: Any = bench.rados.open_ioctx(POOL)
        self.failed = False

    def close(self) -> None:
        self.ioctx.close()

    def name(self, what: str) -> str:
        return f'bench-live-{what}-{uuid.uuid4().hex[:6]}'

    def prepare(self, name: str, disk: Disk, live: bool = True) -> float:
        """``ceph rbd migration prepare --import-only``; its duration."""
        t = time.monotonic()
        out = self.bench.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                   f'{POOL}/{name}', '--source-spec',
                                   json.dumps(disk.spec(live)))
        took = time.monotonic() - t
        want = 'live' if live else 'adapter'
        if out.get('path') != want:
            raise BenchError(f'prepare {name}: path {out.get("path")!r}, not {want!r} '
                             f'({out.get("probe", {}).get("hidden") or "no reason given"})')
        return took

    @staticmethod
    def _checked(img: Any, offset: int) -> None:
        data = img.read(offset, BLOCK)
        if data != block_data(offset):
            raise BenchError(f'read at {offset:#x}: other data than the source holds')

    def image(self, name: str) -> Any:
        import rbd
        return rbd.Image(self.ioctx, name)

    def execute(self, name: str) -> float:
        took, _ = self.execute_task(name)
        return took

    def execute_task(self, name: str) -> Tuple[float, Dict[str, Any]]:
        """execute's seconds (sent to the end the task records) and the task."""
        task, took = self.bench.module_task('execute', f'{POOL}/{name}')
        return took, task

    def commit(self, name: str) -> None:
        self.bench.module_task('commit', f'{POOL}/{name}')

    def remove(self, name: str) -> None:
        try:
            self.bench.remove(name)
        except BenchError as e:
            log(f'cleanup of {POOL}/{name} failed: {e}')

    @property
    def cli_seconds(self) -> float:
        """One ceph CLI start-up and answer (part of prepare's duration)."""
        _, took = timed(lambda: self.bench.ceph('rbd', 'migration', 'task', 'list'))
        return took

    # -- row 1 ---------------------------------------------------------------
    def first_read(self, disk: Disk) -> Dict[str, Any]:
        """prepare's duration, then from its return: open, read at 0, read at
        a data offset; retried until both read the source's data."""
        name = self.name(f'first-{disk.size // GiB}g')
        out: Dict[str, Any] = {'size': disk.size}
        try:
            out['prepare'] = self.prepare(name, disk)
            ready = time.monotonic()
            attempts, last = 0, ''
            while time.monotonic() - ready < FIRST_READ_LIMIT:
                attempts += 1
                try:
                    t = time.monotonic()
                    with self.image(name) as img:
                        out['open'] = time.monotonic() - t
                        t = time.monotonic()
                        self._checked(img, 0)
                        out['read0'] = time.monotonic() - t
                        t = time.monotonic()
                        self._checked(img, disk.data_offset())
                        out['read_data'] = time.monotonic() - t
                    out['first'] = time.monotonic() - ready
                    break
                except Exception as e:  # noqa: BLE001 - retried, the last one reported
                    last = str(e)
                    time.sleep(0.05)
            out['attempts'] = attempts
            if 'first' not in out:
                out['error'] = f'no good read in {FIRST_READ_LIMIT:.0f}s: {last}'
                self.failed = True
        finally:
            self.remove(name)
        return out

    # -- row 2 ---------------------------------------------------------------
    def random_reads(self, name: str, offsets: Sequence[int]) -> Reads:
        """Reads the offsets one after another."""
        reads = Reads()
        with self.image(name) as img:
            for offset in offsets:
                reads.read(img, offset)
        self.failed = self.failed or reads.failed
        return reads

    def reads_during_execute(self, disk: Disk, rng: random.Random,
                             reads: Reads) -> Tuple[int, float]:
        """One live target prepared and executed while a reader reads
        random blocks; the reads that ended before the task did (the first
        ones of ``reads`` after the call, counted) and the execute time."""
        name = self.name('during')
        done = threading.Event()
        box: Dict[str, Any] = {}

        def execute() -> None:
            try:
                box['execute'] = self.execute(name)
            except BenchError as e:
                box['error'] = str(e)
            finally:
                done.set()
        try:
            self.prepare(name, disk)
            during = 0
            with self.image(name) as img:
                copier = threading.Thread(target=execute, daemon=True)
                copier.start()
                while not done.is_set():
                    reads.read(img, disk.random_blocks(rng, 1)[0])
                    during += 0 if done.is_set() else 1
            copier.join()
            if 'error' in box:
                raise BenchError(f'execute {name}: {box["error"]}')
            return during, float(box['execute'])
        finally:
            self.remove(name)

    def reads_row(self, disk: Disk) -> List[Dict[str, Any]]:
        """Reads on a plain image, on a live target before execute, and
        during executes (targets prepared and executed again until
        --reads of them ended while a task ran, ten at most)."""
        n = self.args.reads
        rng = random.Random(7)
        rows: List[Dict[str, Any]] = []
        plain = self.name('plain')
        live = self.name('reads')
        try:
            self.bench.rbd('import', '--no-progress', disk.raw, f'{POOL}/{plain}')
            reads = self.random_reads(plain, disk.random_blocks(rng, n))
            rows.append(dict(what='rbd import (plain image)', reads=reads,
                             counted=reads.latencies))
            self.prepare(live, disk)
            reads = self.random_reads(live, disk.random_blocks(rng, n))
            rows.append(dict(what='live, before execute', reads=reads,
                             counted=reads.latencies))
        finally:
            self.remove(live)
            self.remove(plain)
        counted: List[float] = []
        executes: List[float] = []
        all_reads = Reads()
        while len(counted) < n and len(executes) < 10:
            one = Reads()
            during, took = self.reads_during_execute(disk, rng, one)
            counted += one.latencies[:during]
            executes.append(took)
            all_reads.errors += one.errors
            all_reads.mismatches += one.mismatches
        self.failed = self.failed or all_reads.failed
        rows.append(dict(what='live, during execute', reads=all_reads, counted=counted[:n],
                         note=f'{len(executes)} executes with the reader: '
                              + ', '.join(f'{t:.1f}' for t in executes) + ' s'))
        return rows

    # -- row 3 ---------------------------------------------------------------
    def verify(self, name: str, disk: Disk) -> str:
        """Every data extent read back; '' when all match."""
        with self.image(name) as img:
            for at in disk.extents:
                got = img.read(at, EXTENT)
                want = b''.join(block_data(at + i) for i in range(0, EXTENT, BLOCK))
                if got != want:
                    self.failed = True
                    return f'extent at {at:#x} differs'
            if img.read(disk.size - BLOCK, BLOCK).strip(b'\0') and \
                    disk.size - EXTENT not in disk.extents:
                self.failed = True
                return 'the last block is not zero'
        return ''

    def copy_row(self, disk: Disk) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        local = os.path.join(self.args.work, 'converted.raw')
        _, out['qemu'] = timed(lambda: run(['qemu-img', 'convert', '-O', 'raw',
                                            disk.qcow2, local], timeout=1800))
        os.unlink(local)
        for _ in range(max(1, self.args.repeat)):
            for key, live in (('live', True), ('hidden', False)):
                name = self.name(key)
                try:
                    prepared = self.prepare(name, disk, live)
                    took, task = self.execute_task(name)
                    out[f'{key}_runs'] = out.get(f'{key}_runs', []) + [took]
                    if took <= out.get(key, took):
                        out[key], out[f'{key}_prepare'] = took, prepared
                    out[f'{key}_by'] = (task.get('result') or {}).get('copied_by', 'module')
                    self.commit(name)
                    out[f'{key}_du'] = self.bench.du(f'{POOL}/{name}')
                    out[f'{key}_check'] = out.get(f'{key}_check') or self.verify(name, disk)
                finally:
                    self.remove(name)
        name = self.name('import')
        try:
            _, out['import'] = timed(lambda: self.bench.rbd(
                'import', '--no-progress', disk.raw, f'{POOL}/{name}'))
            out['import_du'] = self.bench.du(f'{POOL}/{name}')
        finally:
            self.remove(name)
        return out

    # -- row 4 ---------------------------------------------------------------
    def active_gid(self) -> int:
        ret, out, err = self.bench.rados.mon_command(
            json.dumps({'prefix': 'mgr dump', 'format': 'json'}), b'', timeout=10)
        if ret != 0:
            raise BenchError(f'mgr dump: {err.strip() or ret}')
        dump = json.loads(out)
        return int(dump['active_gid']) if dump.get('available') else 0

    def module_answers(self, old_gid: int, timeout: float = 120) -> None:
        """Waits for a new active mgr whose module answers a command."""
        import rados
        cmd = json.dumps({'prefix': 'rbd migration task list', 'format': 'json'})
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            try:
                if self.active_gid() in (0, old_gid):
                    time.sleep(0.1)
                    continue
                ret, _, _ = self.bench.rados.mgr_command(cmd, b'', timeout=5)
                if ret == 0:
                    return
            except rados.Error:
                pass
            time.sleep(0.1)
        raise BenchError(f'the module did not answer within {timeout:.0f}s of mgr fail')

    def failover_round(self, name: str, disk: Disk, seed: int) -> Dict[str, Any]:
        stop = threading.Event()
        reads = Reads()
        rng = random.Random(seed)

        def reader() -> None:
            try:
                with self.image(name) as img:
                    while not stop.is_set():
                        reads.read(img, disk.random_blocks(rng, 1)[0])
                        time.sleep(FAILOVER_PAUSE)
            except Exception as e:  # noqa: BLE001 - the open itself, reported
                reads.errors.append(f'open: {e!r}')
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        out: Dict[str, Any] = {}
        try:
            time.sleep(FAILOVER_BEFORE)
            out['before'] = len(reads.latencies)
            gid = self.active_gid()
            t = time.monotonic()
            out['fail_at'] = t - reads.started
            self.bench.ceph('mgr', 'fail', 'x')
            self.module_answers(gid)
            out['back'] = time.monotonic() - t      # from sending mgr fail
            time.sleep(FAILOVER_AFTER)
        finally:
            stop.set()
            thread.join(120)
        if thread.is_alive():
            reads.errors.append('the reader is stuck (no answer 120 s after the round)')
        out['reads'] = reads
        if reads.failed:
            self.failed = True
        return out

    def failover_row(self, disk: Disk) -> List[Dict[str, Any]]:
        name = self.name('failover')
        rounds = []
        try:
            self.prepare(name, disk)
            for i in range(max(1, self.args.repeat)):
                rounds.append(self.failover_round(name, disk, i))
                r = rounds[-1]
                log(f'failover {i + 1}: module back in {r["back"]:.1f}s, '
                    f'{len(r["reads"].latencies)} reads, longest '
                    f'{max(r["reads"].latencies or [0]):.2f}s, {len(r["reads"].errors)} errors')
        finally:
            self.remove(name)
        return rounds


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


# --------------------------------------------------------------------------
# Output


def columns(head: List[str], rows: List[List[str]]) -> Iterator[str]:
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(row: List[str]) -> str:
        return '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    yield line(head)
    yield line(['-' * w for w in widths])
    yield from (line(r) for r in rows)


def print_first_read(results: List[Dict[str, Any]]) -> None:
    print('1. prepare, then the first client read (python-rbd open + 4 KiB at 0 + '
          '4 KiB at a data offset)')
    rows = []
    for r in results:
        f = (lambda k: f'{r[k]:.2f}' if k in r else '-')
        rows.append([human(r['size']), f('prepare'), f('first'), f('open'), f('read0'),
                     f('read_data'), str(r.get('attempts', '-')),
                     r.get('error', 'ok')])
    for line in columns(['virtual', 'prepare s', 'first read s', 'open s', 'read@0 s',
                         'read@data s', 'tries', 'result'], rows):
        print('   ' + line)


def print_reads(results: List[Dict[str, Any]]) -> None:
    print('2. random 4 KiB reads of data blocks, back to back (ms)')
    rows = []
    for r in results:
        reads: Reads = r['reads']
        counted: List[float] = r['counted']
        result = 'ok' if not reads.failed else (
            f'{len(reads.errors)} errors, {len(reads.mismatches)} mismatches')
        rows.append([r['what'], str(len(counted)),
                     ms(statistics.median(counted)) if counted else '-',
                     ms(percentile(counted, 99)) if counted else '-',
                     ms(max(counted)) if counted else '-', result + (
                         f'; {r["note"]}' if r.get('note') else '')])
    for line in columns(['image', 'reads', 'p50', 'p99', 'max', 'result'], rows):
        print('   ' + line)


def print_copy(r: Dict[str, Any], disk: Disk) -> None:
    print(f'3. copy of the {human(disk.size)} compressed qcow2 '
          f'({human(len(disk.extents) * EXTENT)} of data, file {human(disk.file_size)})')
    q = r['qemu']
    rows = []
    for key, label in (('live', f'live execute (copied by {r["live_by"]})'),
                       ('hidden', 'hidden execute (adapter engine)')):
        rows.append([label, f'{r[key]:.2f}', f'{r[key] / q:.2f}x',
                     human(r[f'{key}_du']), f'{r[f"{key}_du"] / r["import_du"]:.2f}x',
                     r[f'{key}_check'] or 'ok'])
    rows.append(['qemu-img convert -O raw (local file)', f'{q:.2f}', '1.00x', '-', '-', '-'])
    rows.append([f'rbd import of the raw ({r["import"]:.1f}s)', '-', '-',
                 human(r['import_du']), '1.00x', '-'])
    for line in columns(['copy', 'exec s', 'vs qemu-img', 'rbd du USED', 'vs import',
                         'data'], rows):
        print('   ' + line)
    print(f'   live / hidden exec: {r["live"] / r["hidden"]:.2f}x (best of '
          f'{len(r["live_runs"])}; runs live {", ".join(f"{t:.2f}" for t in r["live_runs"])}, '
          f'hidden {", ".join(f"{t:.2f}" for t in r["hidden_runs"])}); prepare: live '
          f'{r["live_prepare"]:.2f}s, hidden {r["hidden_prepare"]:.2f}s')


def print_failover(rounds: List[Dict[str, Any]]) -> None:
    print(f'4. a reader (4 KiB every {FAILOVER_PAUSE * 1000:.0f} ms) across '
          '`ceph mgr fail x` (target: no errors)')
    rows = []
    for i, r in enumerate(rounds, 1):
        reads: Reads = r['reads']
        lat = reads.latencies
        rows.append([str(i), f'{r["back"]:.1f}', str(len(lat)), str(r['before']),
                     f'{max(lat):.2f}' if lat else '-',
                     ms(statistics.median(lat)) if lat else '-',
                     str(len(reads.errors)), str(len(reads.mismatches))])
    for line in columns(['round', 'module back s', 'reads', 'before fail',
                         'longest read s', 'p50 ms', 'errors', 'mismatches'], rows):
        print('   ' + line)
    for r in rounds:
        if r['reads'].failed:
            print(f'   round {rounds.index(r) + 1}: mgr fail sent at {r["fail_at"]:.2f}s, '
                  f'module back {r["fail_at"] + r["back"]:.2f}s into the reads')
        for e in r['reads'].errors[:3]:
            print(f'   error: {e}')
        for m in r['reads'].mismatches[:3]:
            print(f'   mismatch: {m}')


# --------------------------------------------------------------------------
# Main


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('--dir', default=DEFAULT_DIR,
                   help=f'cluster directory, emptied first (default {DEFAULT_DIR})')
    p.add_argument('--osds', type=int, default=3,
                   help='memstore OSDs (default 3; its erasure-coded pool needs 3)')
    p.add_argument('--osd-size', type=parse_size, default=8 * GiB)
    p.add_argument('--data', type=parse_size, default=384 * MiB,
                   help='compressible data in each disk (default 384M)')
    p.add_argument('--reads', type=int, default=2000,
                   help='reads per image in the reads row (default 2000)')
    p.add_argument('--repeat', type=int, default=3,
                   help='first-read runs per size, copy runs of each path, and '
                        'failover rounds (default 3)')
    p.add_argument('--only', default='', help='comma-separated rows: ' + ','.join(ROWS))
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.only.split(',') if r.strip()] or list(ROWS)
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        p.error(f'--only: unknown {", ".join(sorted(unknown))}; known: {", ".join(ROWS)}')
    if args.data < EXTENT or args.data > SIZES[-1] // 2:
        p.error('--data: between 4M and 512M')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    missing = missing_packages(PACKAGES)
    if missing:
        log(f'missing packages {" ".join(missing)}; run /usr/bin/python3 qa/cluster.py install')
        return 1
    t_start = time.monotonic()
    cluster = Cluster(args.dir)
    if cluster.state and cluster.running():
        log(f'{args.dir} holds a running cluster; stop it or give another --dir')
        return 1
    args.work = os.path.join(cluster.dir, 'bench-work')
    bench: Optional[Bench] = None
    live: Optional[LiveBench] = None
    failed = False
    try:
        log(f'starting a cluster in {cluster.dir}: {args.osds} memstore OSD(s) of '
            f'{human(args.osd_size)}, nginx')
        cluster.start(osds=args.osds, osd_size=args.osd_size, http=True)
        state = cluster.state
        assert state and state.http_root and state.http_port
        www = os.path.join(state.http_root, 'live-bench')
        os.makedirs(www)
        os.makedirs(args.work)
        url = f'http://127.0.0.1:{state.http_port}/live-bench'
        sizes = SIZES if 'first-read' in args.rows else SIZES[:1]
        disks = {size: make_disk(args.work, www, url, size, args.data) for size in sizes}
        bench = Bench(cluster, args.work)
        bench.connect()
        live = LiveBench(cluster, bench, args)
        cli = live.cli_seconds
        big = disks[SIZES[0]]
        out: List[Callable[[], None]] = []
        if 'first-read' in args.rows:
            results = [live.first_read(disks[size]) for _ in range(max(1, args.repeat))
                       for size in sizes]
            out.append(lambda: print_first_read(results))
        if 'reads' in args.rows:
            reads = live.reads_row(big)
            out.append(lambda: print_reads(reads))
        if 'copy' in args.rows:
            copy = live.copy_row(big)
            out.append(lambda: print_copy(copy, big))
        if 'failover' in args.rows:
            rounds = live.failover_row(big)
            out.append(lambda: print_failover(rounds))
        print()
        print(f'rbd_migration live import bench: {args.osds} memstore OSD(s), pool {POOL} '
              f'(size 1), {os.cpu_count()} CPUs; disks of {human(args.data)} compressible '
              f'data in 4 MiB extents ({", ".join(human(s) for s in sizes)} virtual); '
              f'one ceph CLI command takes {cli:.2f}s here (in prepare s)')
        for show in out:
            print()
            show()
        print()
        failed = live.failed
        print(f'runtime {time.monotonic() - t_start:.0f}s'
              + ('; FAILED reads above' if failed else ''))
    except KeyboardInterrupt:
        log('interrupted; cleaning up')
        failed = True
    except (BenchError, RuntimeError, subprocess.SubprocessError) as e:
        log(f'error: {e}')
        failed = True
    finally:
        if live is not None:
            live.close()
        if bench is not None:
            bench.close()
        log(f'stopping the cluster in {cluster.dir}')
        cluster.stop(purge=True)
        shutil.rmtree(args.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

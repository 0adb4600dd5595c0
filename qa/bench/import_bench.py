#!/usr/bin/python3
"""Import benchmark: rbd_migration against qemu-img and librbd.

    qa/bench/import_bench.py [--dir DIR] [--size 1G] [--keep] [--repeat N]
                             [--only NAME[,NAME]] [--adapter-concurrency N]

Starts its own cluster under DIR (3 memstore OSDs of 5 GiB, RGW and nginx)
unless DIR already holds a running one, generates the sources in DIR's
``bench-work`` folder, imports each source with each peer one after the
other, checks every target's sha256 against the reference (``qemu-img
convert -O raw`` of the source; for a raw source, the file itself; for
export-diff, the exported image at HEAD), measures
``rbd du`` and removes the target, then prints one table.  It stops what it
started (``--keep`` leaves the cluster and the sources in place).

Sources (sizes from --size, default 1 GiB); without --only: dense, sparse,
qcow2-z, chain, http, s3.  export-diff and the -http, -s3 ones are asked for
with --only: at 1 GiB on 2 cores they add more than ten minutes, most of it
qemu-img stalling over http (see STALLS_RETRIED):
  dense      raw, random data in 4 MiB pieces (incompressible, no zeros)
  sparse     raw, 10% allocated in random 1 MiB extents
  qcow2-z    qcow2 compressed by ``qemu-img convert -c`` from compressible
             (4 bits/byte), non-zero data
  chain      qcow2 overlay 3 deep: base (50% allocated) + 3 overlays each
             writing ~10% at offsets no other overlay writes (the third also
             zeroes 1% of the base)
  export-diff  ``rbd export`` of an image at s1 (50% allocated) and the
             ``rbd export-diff`` files s1->s2, s2->s3, s3->HEAD (each
             writing ~10%, s3 also discarding 1%), made from an image of
             the bench cluster; the reference is that image at HEAD
  http       the dense raw served by nginx
  s3         the dense raw in the RGW bucket
  qcow2-z-http, chain-http, export-diff-http
             the same files served by nginx, side by side in one folder
             (the chain's relative backing names resolve there)
  qcow2-z-s3, chain-s3, export-diff-s3
             the same files in the RGW bucket, side by side under one prefix

Peers:
  ours/adapter   ceph rbd migration prepare --import-only / execute / commit,
                 with "rbd_migration": {"engine": "adapter"} for raw sources
                 (qcow2 sources choose the adapter on their own)
  ours/librbd    the same without forcing: the module runs librbd's import
  qemu-img       qemu-img convert -p -m 16 -W -O raw SRC rbd:rbd/IMG:conf=CONF
                 (where qemu-img reads SRC: the files but export-diff, and
                 the qcow2 ones over http; a convert over http that stalls
                 is killed and run again, see STALLS_RETRIED)
  librbd         rbd migration prepare --import-only --source-spec-path /
                 execute / commit (only what librbd can read)

Timings: "exec s" is what an operator waits for: for ours from launching
``ceph rbd migration execute`` until the task completed, as the time the
task records then (the mgr's wall clock, on this machine; polled every
0.2 s over librados, since polling faster would itself load the mgr); for librbd the ``rbd migration execute``
command; for qemu-img the whole convert (it creates the image too).  "task s"
is the task's own run time in the mgr (started to finished, as the task
records them), "task MB/s" the same size over it.  "CPU s" and "faults" are
the CPU seconds and minor page faults, during exec, of the process that
copies: ceph-mgr and its execute children for ours, the rbd CLI or qemu-img
otherwise; "server CPU s" and "OSD CPU s" those of the source's server
(nginx, RGW) and of the OSDs; "CPU floor s" the three over the machine's
cores, the exec time if they kept every core busy (on a small machine, a
remote row's server shares the cores with the copy and the OSDs: its ratio
to the file row cannot pass their floors' ratio); "host busy" the whole
machine's busy CPU time during exec over exec s times its cores (near 100%:
bound by the cores, not by waiting).  MB/s is 10^6 bytes of
virtual size per exec second; ratios are MB/s over the peer's MB/s (above 1:
faster); "vs file" is a remote row's MB/s over the same peer's on the file
it serves.  "req/GiB" is what the source's server saw during exec, per GiB
of virtual size: the lines nginx wrote to its access log for the run's
folder, or the delta of RGW's "get" perf counter (the whole RGW's: other
clients of a shared cluster count too).
Timings are reported, never asserted; a target whose sha256 differs from the
reference is reported FAILED instead of a speed, and the exit status is 1.
"""
import argparse
import errno
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import urlsplit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from qa.cluster import (S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY,  # noqa: E402
                        Cluster, PACKAGES, missing_packages, parse_size)

MiB = 1 << 20
GiB = 1 << 30
PIECE = 4 * MiB            # generation and hashing piece
BLOCK = 4096               # allocation granularity of a raw source
OBJECT = 4 * MiB           # rbd's default object size: what `rbd du` counts in
EXTENT = MiB               # the sparse sources' extent size
POOL = 'rbd'
CORES = os.cpu_count() or 1
DEFAULT_DIR = '/tmp/rbd-migration-bench'
ROOTS_OPTION = 'mgr/rbd_migration/file_source_roots'
CEILING_TOTAL = '1G'

LIBRBD_CANNOT = 'librbd cannot read this'
STALLS_RETRIED = 2         # runs beyond --repeat for those a remote qemu-img stalled in


class BenchError(Exception):
    """A step failed; the message says which and why."""


class TimedOut(BenchError):
    """A command gave no answer in its time and was killed."""


def log(msg: str) -> None:
    print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def human(n: Optional[float]) -> str:
    if n is None:
        return '-'
    for unit, size in (('GiB', GiB), ('MiB', MiB), ('KiB', 1024)):
        if abs(n) >= size:
            return f'{n / size:.2f} {unit}'
    return f'{int(n)} B'


# --------------------------------------------------------------------------
# Subprocesses: every one checked, errors with the command and its stderr


_SECRETS: List[str] = [S3_SECRET_KEY]


def _shown(argv: Sequence[str]) -> str:
    text = ' '.join(argv)
    for secret in _SECRETS:
        text = text.replace(secret, '***')
    return text if len(text) < 300 else text[:300] + '...'


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in (text or '').strip().splitlines() if ln.strip()][-lines:]
    return ' | '.join(kept) or '(no output)'


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 600,
        input: Optional[str] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise TimedOut(f'{_shown(argv)}: no answer after {timeout:.0f}s') from None
    except FileNotFoundError:
        raise BenchError(f'{argv[0]}: not installed (qa/cluster.py install)') from None
    if check and r.returncode != 0:
        raise BenchError(f'{_shown(argv)} failed (exit {r.returncode}): '
                         f'{_tail(r.stderr or r.stdout)}')
    return r


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


def child_usage() -> Tuple[float, int]:
    """CPU seconds and minor faults of the children waited for so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _stat(pid: int) -> List[str]:
    """/proc/PID/stat's fields from the state on (field 3 of proc(5) is [0])."""
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()


def proc_usage(pid: int, family: bool = False) -> Tuple[float, int]:
    """CPU seconds and minor faults of a running process; with ``family``,
    its child processes' too (those it waited for, and those running: the
    mgr's execute children)."""
    try:
        fields = _stat(pid)
    except OSError as e:
        raise BenchError(f'reading /proc/{pid}/stat: {e}') from None
    own, waited = (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    cpu = (own + (waited if family else 0)) / os.sysconf('SC_CLK_TCK')
    faults = int(fields[7]) + (int(fields[8]) if family else 0)
    for child in child_pids([pid]) if family else []:
        try:
            child_cpu, child_faults = proc_usage(child, family=True)
        except BenchError:
            continue    # ended meanwhile: its time moves to its parent's
        cpu, faults = cpu + child_cpu, faults + child_faults
    return cpu, faults


def child_pids(parents: Sequence[int]) -> List[int]:
    """The running processes whose parent is one of ``parents``."""
    out = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                if int(_stat(int(name))[1]) in parents:
                    out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue    # gone meanwhile
    return out


def cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds of running processes (those that exit meanwhile: 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += proc_usage(pid)[0]
        except BenchError:
            pass
    return total


def usage_delta(before: Tuple[float, int], after: Tuple[float, int]) -> Tuple[float, int]:
    return after[0] - before[0], after[1] - before[1]


def host_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every
    process and the kernel), from /proc/stat: what a copy bound by the
    machine's cores rather than by waiting shows as a busy fraction near 1."""
    with open('/proc/stat') as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


# --------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    key: str                   # short name (--only)
    label: str                 # table label
    path: str                  # the file (for http/s3: the file uploaded)
    fmt: str                   # 'raw' or 'qcow'
    size: int                  # virtual size
    sha256: str = ''           # of the virtual disk (reference)
    allocated: int = 0         # bytes: non-zero 4 KiB blocks / qemu-img map data
    allocated_objects: int = 0  # bytes: 4 MiB objects holding any of it
    librbd_reads: bool = True  # can librbd's import read it correctly?
    note: str = ''
    diffs: List[str] = field(default_factory=list)  # export-diff files after path
    layers: List[str] = field(default_factory=list)  # backing files path names
    qemu_reads: bool = True    # can qemu-img read it (from qemu_path())?
    where: str = 'file'        # 'file', 'http' or 's3'
    folder_url: str = ''       # for http and s3: the URL the files are under
    file_key: str = ''         # for http and s3: the file source served

    @property
    def files(self) -> List[str]:
        """Every file the source reads: served side by side when remote."""
        return [self.path, *self.layers, *self.diffs]

    def stream(self, path: str) -> Dict[str, Any]:
        if self.where == 'file':
            return {'type': 'file', 'file_path': path}
        url = self.folder_url + os.path.basename(path)
        if self.where == 'http':
            return {'type': 'http', 'url': url}
        return {'type': 's3', 'url': url, 'access_key': S3_ACCESS_KEY,
                'secret_key': S3_SECRET_KEY}

    def spec(self) -> Dict[str, Any]:
        """The source-spec (without the module's own options)."""
        out: Dict[str, Any] = {'type': self.fmt, 'stream': self.stream(self.path)}
        if self.diffs:
            out['diffs'] = [{'stream': self.stream(d)} for d in self.diffs]
        return out

    def qemu_path(self) -> str:
        """What qemu-img convert reads: the file or its URL."""
        stream = self.stream(self.path)
        return stream.get('file_path') or stream['url']

    def served(self, where: str, folder_url: str) -> 'Source':
        """This source's files served by nginx or in the RGW bucket."""
        return replace(self, key=f'{self.key}-{where}', label=f'{self.label} {where}',
                       where=where, folder_url=folder_url, file_key=self.key,
                       qemu_reads=self.qemu_reads and where == 'http' and self.fmt == 'qcow')


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for piece in iter(lambda: f.read(PIECE), b''):
            h.update(piece)
    return h.hexdigest()


def raw_allocation(path: str) -> Tuple[int, int]:
    """(non-zero 4 KiB blocks, 4 MiB objects holding one) in bytes; holes
    are skipped with SEEK_DATA."""
    zero_piece, zero_block = bytes(PIECE), bytes(BLOCK)
    blocks, objects = 0, set()
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            pos -= pos % PIECE
            data = os.pread(fd, PIECE, pos)
            if data != zero_piece[:len(data)]:
                view = memoryview(data)
                for i in range(0, len(data), BLOCK):
                    if view[i:i + BLOCK] != zero_block[:len(view[i:i + BLOCK])]:
                        blocks += 1
                        objects.add((pos + i) // OBJECT)
            pos += PIECE
    return blocks * BLOCK, len(objects) * OBJECT


def qemu_allocation(path: str) -> Tuple[int, int]:
    """Data extents of the whole backing chain per ``qemu-img map``."""
    out = run(['qemu-img', 'map', '--output', 'json', path], timeout=300).stdout
    data = 0
    objects: Set[int] = set()
    for ext in json.loads(out):
        if ext.get('data'):
            data += ext['length']
            first, last = ext['start'] // OBJECT, (ext['start'] + ext['length'] - 1) // OBJECT
            objects.update(range(first, last + 1))
    return data, len(objects) * OBJECT


def qemu_reference(path: str, scratch: str) -> str:
    """sha256 of ``qemu-img convert -O raw`` of the image."""
    out = os.path.join(scratch, f'ref-{uuid.uuid4().hex[:6]}.raw')
    try:
        run(['qemu-img', 'convert', '-O', 'raw', path, out], timeout=1800)
        return _sha_file(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)


def gen_dense(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, 'wb') as f:
        for off in range(0, size, PIECE):
            piece = os.urandom(min(PIECE, size - off))
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


def write_sparse(path: str, size: int, positions: Sequence[int]) -> None:
    """A raw file of ``size`` with random data in the 1 MiB extents given
    (by index), holes elsewhere."""
    with open(path, 'wb') as f:
        f.truncate(size)
        for i in sorted(positions):
            f.seek(i * EXTENT)
            f.write(os.urandom(EXTENT))


# 4 bits of entropy per byte, never zero: zlib halves it, nothing is all-zero.
_COMPRESSIBLE = bytes(0x41 + (b & 0x0f) for b in range(256))


def gen_compressible(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, 'wb') as f:
        for off in range(0, size, PIECE):
            piece = os.urandom(min(PIECE, size - off)).translate(_COMPRESSIBLE)
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


REMOTE_OF = ('qcow2-z', 'chain', 'export-diff')   # files also served as KEY-http, KEY-s3


def make_sources(work: str, size: int, wanted: Callable[[str], bool],
                 publish: 'Publisher', bench: 'Bench') -> List[Source]:
    rng = random.Random(20240611)
    extents = size // EXTENT
    tenth = max(1, extents // 10)
    sources: List[Source] = []
    scratch = os.path.join(work, 'scratch')
    os.makedirs(scratch, exist_ok=True)

    def wants(key: str) -> bool:
        return any(wanted(k) for k in (key, f'{key}-http', f'{key}-s3'))

    def add(source: Source) -> None:
        """The file source and the remote ones asked for, side by side."""
        for key, made in ((source.key, lambda: source),
                          (f'{source.key}-http', lambda: publish.http(source)),
                          (f'{source.key}-s3', lambda: publish.s3(source))):
            if wanted(key):
                sources.append(made())

    dense = os.path.join(work, 'dense.raw')
    if any(wanted(k) for k in ('dense', 'http', 's3')):
        dense_sha, t = timed(lambda: gen_dense(dense, size))
        log(f'dense.raw: {human(size)} random in {t:.1f}s')
        dense_src = Source('dense', f'dense raw {human(size)}', dense, 'raw', size,
                           dense_sha, *raw_allocation(dense))
        if wanted('dense'):
            sources.append(dense_src)

    if wanted('sparse'):
        path = os.path.join(work, 'sparse.raw')
        write_sparse(path, size, rng.sample(range(extents), tenth))
        alloc, objs = raw_allocation(path)
        sources.append(Source('sparse', f'sparse raw 10% {human(size)}', path, 'raw',
                              size, _sha_file(path), alloc, objs))
        log(f'sparse.raw: {tenth} random 1 MiB extents')

    if wants('qcow2-z'):
        plain = os.path.join(scratch, 'compressible.raw')
        path = os.path.join(work, 'compressed.qcow2')
        generated = gen_compressible(plain, size)
        _, t = timed(lambda: run(['qemu-img', 'convert', '-c', '-O', 'qcow2', plain, path],
                                 timeout=3600))
        os.unlink(plain)
        file_size = os.path.getsize(path)
        mapped = json.loads(run(['qemu-img', 'map', '--output', 'json', path]).stdout)
        flagged = [e for e in mapped if e.get('compressed')]
        if file_size > 0.8 * size or (mapped and 'compressed' in mapped[0] and not flagged):
            raise BenchError(f'{path}: not compressed ({human(file_size)} for '
                             f'{human(size)} of data); qemu-img convert -c did not compress')
        ref = qemu_reference(path, scratch)
        if ref != generated:
            raise BenchError(f'{path}: qemu-img reads back other data than was written')
        alloc, objs = qemu_allocation(path)
        add(Source('qcow2-z', f'qcow2 compressed {human(size)}', path, 'qcow',
                   size, ref, alloc, objs, librbd_reads=False,
                   note=f'file {human(file_size)} ({file_size / size:.0%} '
                        f'of virtual), compressed in {t:.0f}s'))
        log(f'compressed.qcow2: {human(file_size)} in {t:.1f}s')

    if wants('chain'):
        add(make_chain(work, scratch, size, rng))

    if wants('export-diff'):
        add(make_export_diff(bench, work, size, rng))

    if wanted('http'):
        sources.append(replace(publish.http(dense_src), key='http'))
    if wanted('s3'):
        _, t = timed(lambda: sources.append(replace(publish.s3(dense_src), key='s3')))
        log(f's3 upload of {human(size)}: {t:.1f}s')
    shutil.rmtree(scratch, ignore_errors=True)
    return sources


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.exists(dst):
        os.unlink(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_chain(work: str, scratch: str, size: int, rng: random.Random) -> Source:
    """base.qcow2 (50% allocated) <- ov1 <- ov2 <- ov3.qcow2, each overlay
    writing ~10% of the disk in random 1 MiB extents no other overlay
    writes; ov3 also zeroes 1% of the base's data."""
    extents = size // EXTENT
    tenth = max(1, extents // 10)
    base_raw = os.path.join(scratch, 'base.raw')
    base = os.path.join(work, 'base.qcow2')
    base_pos = rng.sample(range(extents), extents // 2)
    write_sparse(base_raw, size, base_pos)
    run(['qemu-img', 'convert', '-O', 'qcow2', base_raw, base], timeout=1800)
    os.unlink(base_raw)
    free = list(range(extents))
    rng.shuffle(free)
    previous = 'base.qcow2'
    top = base
    layers: List[str] = []
    for n in (1, 2, 3):
        mine, free = free[:tenth], free[tenth:]
        name = f'overlay{n}.qcow2'
        layers.insert(0, top)
        top = os.path.join(work, name)
        run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', previous, name],
            cwd=work)
        pieces = os.path.join(scratch, f'ov{n}')
        os.makedirs(pieces)
        cmds: List[str] = []
        for i in sorted(mine):
            piece = os.path.join(pieces, str(i))
            with open(piece, 'wb') as f:
                f.write(os.urandom(EXTENT))
            cmds += ['-c', f'write -q -s {piece} {i * EXTENT} {EXTENT}']
        if n == 3:
            untouched = set(free)
            hidden = [i for i in base_pos if i in untouched][:max(1, extents // 100)]
            cmds += [a for i in hidden for a in ('-c', f'write -q -z {i * EXTENT} {EXTENT}')]
        run(['qemu-io', '-f', 'qcow2', *cmds, top], timeout=1800)
        shutil.rmtree(pieces)
        previous = name
    ref = qemu_reference(top, scratch)
    alloc, objs = qemu_allocation(top)
    log(f'chain: base 50% + 3 overlays of {tenth} MiB each')
    return Source('chain', f'qcow2 chain 3-deep {human(size)}', top, 'qcow', size, ref,
                  alloc, objs, librbd_reads=False, layers=layers,
                  note='base 50% + 3 x 10% overlays, 1% zeroed in the top')


def make_export_diff(bench: 'Bench', work: str, size: int, rng: random.Random) -> Source:
    """What an operator keeps of an image: ``rbd export`` at s1 (50%
    allocated) and the ``rbd export-diff`` files s1->s2, s2->s3 and s3->HEAD,
    each writing ~10% where nothing else writes, s3 also discarding 1% of
    s1's data.  Made from an image of the bench cluster, which is removed
    once exported: the reference is its HEAD."""
    import rbd
    extents = size // EXTENT
    tenth = max(1, extents // 10)
    free = list(range(extents))
    rng.shuffle(free)
    base, free = free[:extents // 2], free[extents // 2:]
    name = f'bench-export-diff-src-{uuid.uuid4().hex[:6]}'
    spec = f'{POOL}/{name}'
    files = [os.path.join(work, f) for f in ('ed-s1.raw', 'ed-s1-s2.diff', 'ed-s2-s3.diff',
                                             'ed-s3-head.diff')]
    ioctx = bench.rados.open_ioctx(POOL)
    try:
        rbd.RBD().create(ioctx, name, size)
        with rbd.Image(ioctx, name) as img:
            for snap in ('s1', 's2', 's3', None):
                mine = base if snap == 's1' else free[:tenth]
                free = free if snap == 's1' else free[tenth:]
                for i in sorted(mine):
                    img.write(os.urandom(EXTENT), i * EXTENT)
                if snap == 's3':
                    for i in base[:max(1, extents // 100)]:
                        img.discard(i * EXTENT, EXTENT)
                if snap:
                    img.create_snap(snap)
        bench.rbd('export', '--no-progress', f'{spec}@s1', files[0])
        for since, upto, path in zip(('s1', 's2', 's3'), ('@s2', '@s3', ''), files[1:]):
            bench.rbd('export-diff', '--no-progress', '--from-snap', since, spec + upto, path)
        ref = bench.sha_image(spec)
        alloc, objs = bench.allocation(spec)
    finally:
        ioctx.close()
        if bench.exists(spec):
            bench.rbd('snap', 'purge', '--no-progress', spec)
            bench.rbd('rm', '--no-progress', spec)
    sizes = ', '.join(human(os.path.getsize(f)) for f in files)
    log(f'export-diff: export at s1 and 3 diffs ({sizes})')
    return Source('export-diff', f'export + 3 export-diffs {human(size)}', files[0],
                  'export-diff', size, ref, alloc, objs, librbd_reads=False,
                  qemu_reads=False, diffs=files[1:],
                  note=f'export at s1 (50%) and diffs of 10% each, 1% discarded; files {sizes}')


def s3_client(rgw_port: int) -> Any:
    import boto3
    from botocore.config import Config
    return boto3.client('s3', endpoint_url=f'http://127.0.0.1:{rgw_port}',
                        aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name='us-east-1',
                        config=Config(s3={'addressing_style': 'path'},
                                      signature_version='s3v4'))


def s3_upload(rgw_port: int, path: str, key: str) -> None:
    from boto3.s3.transfer import TransferConfig
    try:
        s3_client(rgw_port).upload_file(
            path, S3_BUCKET, key,
            Config=TransferConfig(multipart_threshold=64 * MiB,
                                  multipart_chunksize=64 * MiB, max_concurrency=4))
    except Exception as e:
        raise BenchError(f'uploading {path} to s3://{S3_BUCKET}/{key}: {e}') from None


@dataclass
class Publisher:
    """Puts a source's files side by side in one folder of this run, where
    nginx serves them and in the RGW bucket, and takes them away again."""
    http_root: str
    http_port: int
    rgw_port: int
    conf: str
    folder: str = field(default_factory=lambda: f'bench-{uuid.uuid4().hex[:6]}')
    keys: List[str] = field(default_factory=list)

    def http(self, source: Source) -> Source:
        served = os.path.join(self.http_root, self.folder)
        os.makedirs(served, exist_ok=True)
        for path in source.files:
            _link_or_copy(path, os.path.join(served, os.path.basename(path)))
        return source.served('http', f'http://127.0.0.1:{self.http_port}/{self.folder}/')

    def s3(self, source: Source) -> Source:
        for path in source.files:
            key = f'{self.folder}/{os.path.basename(path)}'
            if key not in self.keys:
                self.keys.append(key)
                s3_upload(self.rgw_port, path, key)
        return source.served('s3', f'http://127.0.0.1:{self.rgw_port}/{S3_BUCKET}/'
                                   f'{self.folder}/')

    def remove(self) -> None:
        shutil.rmtree(os.path.join(self.http_root, self.folder), ignore_errors=True)
        if not self.keys:
            return
        try:
            client = s3_client(self.rgw_port)
            for key in self.keys:
                client.delete_object(Bucket=S3_BUCKET, Key=key)
            run(['radosgw-admin', '--conf', self.conf, 'gc', 'process', '--include-all'],
                timeout=300)
        except Exception as e:  # noqa: BLE001 - report and go on cleaning
            log(f'removing the S3 objects: {e}')


# --------------------------------------------------------------------------
# One measurement


@dataclass
class Result:
    source: Source
    peer: str
    prepare: Optional[float] = None
    execute: Optional[float] = None
    task: Optional[float] = None
    commit: Optional[float] = None
    used: Optional[int] = None
    ok: Optional[bool] = None           # sha256 matched
    error: str = ''
    skipped: str = ''
    path: str = ''                      # the module's engine, for ours
    stats: Dict[str, Any] = field(default_factory=dict)
    runs: List[float] = field(default_factory=list)
    stalls: List[float] = field(default_factory=list)  # killed after these seconds
    cpu: Optional[float] = None         # CPU seconds of the copying process
    server_cpu: Optional[float] = None  # of the source's server (nginx, RGW)
    osd_cpu: Optional[float] = None     # of the OSDs
    busy: Optional[float] = None        # the machine's busy fraction during exec
    faults: Optional[int] = None        # its minor page faults
    requests: Optional[int] = None      # what the source's server saw

    @property
    def mbps(self) -> Optional[float]:
        if not self.ok or not self.execute:
            return None
        return self.source.size / 1e6 / self.execute

    @property
    def cpu_floor(self) -> Optional[float]:
        """Seconds the exec would take if its CPU time (copier, server,
        OSDs) kept every core busy: no copy of this work on this machine
        runs faster."""
        if self.cpu is None or self.server_cpu is None or self.osd_cpu is None:
            return None
        return (self.cpu + self.server_cpu + self.osd_cpu) / CORES

    @property
    def requests_per_gib(self) -> Optional[float]:
        return None if self.requests is None else self.requests / (self.source.size / GiB)


class Bench:
    def __init__(self, cluster: Cluster, work: str) -> None:
        assert cluster.state
        self.cluster = cluster
        self.conf = cluster.state.conf
        self.work = work
        self.rados: Any = None
        #: Imports librbd cannot read take the hidden path, not the live view.
        self.hidden = False

    # -- plumbing ----------------------------------------------------------
    def connect(self) -> None:
        import rados
        self.rados = rados.Rados(conffile=self.conf)
        self.rados.connect(timeout=30)

    def close(self) -> None:
        if self.rados is not None:
            self.rados.shutdown()
            self.rados = None

    def ceph(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """A module command still running after command_wait answers
        EINPROGRESS (115): repeated until it gives its own answer."""
        deadline = time.monotonic() + timeout
        while True:
            r = run(['ceph', '--conf', self.conf, *args], check=False, timeout=timeout)
            if r.returncode != 115 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if check and r.returncode != 0:
            raise BenchError(f"{_shown(['ceph', *args])} failed (exit {r.returncode}): "
                             f'{_tail(r.stderr or r.stdout)}')
        return r

    def ceph_json(self, *args: str) -> Any:
        out = self.ceph(*args, '--format', 'json').stdout
        try:
            return json.loads(out)
        except ValueError:
            raise BenchError(f'ceph {" ".join(args)}: not JSON: {out[:200]!r}') from None

    def rbd(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        return run(['rbd', '--conf', self.conf, *args], check=check, timeout=timeout)

    def wait_task(self, task_id: str, timeout: float = 3600) -> Dict[str, Any]:
        """Poll ``rbd migration task get`` (over librados, no CLI start-up per
        poll) until the task ends; its dict when completed.  Each poll is a
        command the mgr answers while it copies: few of them."""
        cmd = json.dumps({'prefix': 'rbd migration task get', 'task_id': task_id,
                          'format': 'json'})
        deadline = time.monotonic() + timeout
        while True:
            ret, out, err = self.rados.mgr_command(cmd, b'', timeout=60)
            if ret == 0:
                return dict(json.loads(out)['task'])
            if ret != -errno.EAGAIN:
                raise BenchError(f'task {task_id}: {err.strip() or ret}')
            if time.monotonic() > deadline:
                raise BenchError(f'task {task_id} still active after {timeout:.0f}s')
            time.sleep(0.2)

    def module_task(self, action: str, target: str) -> Tuple[Dict[str, Any], float]:
        """``ceph rbd migration <action> <target>``, sent over the same
        librados connection as the polls: the ceph CLI's own start-up (see
        the note under the table) is not the module's speed.  The task, and
        the seconds from sending the command to the end the task records."""
        t0, sent = time.monotonic(), time.time()
        cmd = json.dumps({'prefix': f'rbd migration {action}', 'image_spec': target,
                          'format': 'json'})
        ret, out, err = self.rados.mgr_command(cmd, b'', timeout=60)
        answer = json.loads(out) if ret == 0 else {}
        if not answer.get('task'):
            raise BenchError(f'ceph rbd migration {action} {target}: no task '
                             f'({answer.get("message") or err.strip() or ret})')
        task = self.wait_task(str(answer['task']['id']))
        return task, (task['finished'] - sent if task.get('finished')
                      else time.monotonic() - t0)

    def mgr_pid(self) -> int:
        pids = {n: p for n, p in self.cluster.pids().items() if n.startswith('mgr.')}
        if len(pids) != 1:
            raise BenchError(f'expected one ceph-mgr of this cluster, found {sorted(pids)}')
        return next(iter(pids.values()))

    def exists(self, spec: str) -> bool:
        r = self.rbd('info', spec, check=False, timeout=120)
        if r.returncode == 0:
            return True
        if 'No such file' in r.stderr or 'not found' in r.stderr.lower():
            return False
        raise BenchError(f'rbd info {spec}: {_tail(r.stderr)}')

    def remove(self, name: str) -> None:
        """Whatever an import left under this name: a migration of either
        engine is aborted, the image removed."""
        spec = f'{POOL}/{name}'
        if self.ceph('rbd', 'migration', 'status', spec, '--format', 'json',
                     check=False, timeout=120).returncode == 0:
            log(f'aborting the migration of {spec}')
            self.module_task('abort', spec)
        if self.exists(spec):
            self.rbd('snap', 'purge', '--no-progress', spec)
            self.rbd('rm', '--no-progress', spec)

    def df(self) -> Tuple[int, int]:
        stats = self.ceph_json('df')['stats']
        return int(stats['total_used_raw_bytes']), int(stats['total_avail_bytes'])

    def pool_full(self) -> bool:
        pools = self.ceph_json('osd', 'dump')['pools']
        return any(p['pool_name'] == POOL and 'full' in str(p.get('flags_names', ''))
                   for p in pools)

    def check_room(self, size: int, wait: float = 120) -> None:
        """Room for one more import, waiting a while for the OSDs to free
        what the targets before held (memstore frees removed images late)."""
        deadline = time.monotonic() + wait
        used, avail = self.df()
        while (avail < 1.5 * size or self.pool_full()) and time.monotonic() < deadline:
            time.sleep(2)
            used, avail = self.df()
        if avail < 1.5 * size:
            raise BenchError(f'ceph df: {human(avail)} available, {human(used)} used; '
                             f'an import of {human(size)} would not fit; restart with '
                             'larger OSDs')

    def sha_image(self, spec: str) -> str:
        h = hashlib.sha256()
        proc = subprocess.Popen(['rbd', '--conf', self.conf, 'export', '--no-progress',
                                 spec, '-'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout and proc.stderr
        for piece in iter(lambda: proc.stdout.read(PIECE), b''):  # type: ignore
            h.update(piece)
        err = proc.stderr.read().decode(errors='replace')
        if proc.wait() != 0:
            raise BenchError(f'rbd export {spec} failed: {_tail(err)}')
        return h.hexdigest()

    def allocation(self, spec: str) -> Tuple[int, int]:
        """(allocated bytes, 4 MiB objects holding any) per ``rbd diff``."""
        data = 0
        objects: Set[int] = set()
        for ext in json.loads(self.rbd('diff', '--format', 'json', spec).stdout):
            if str(ext.get('exists')).lower() == 'true':
                data += ext['length']
                first = ext['offset'] // OBJECT
                objects.update(range(first, (ext['offset'] + ext['length'] - 1) // OBJECT + 1))
        return data, len(objects) * OBJECT

    def rgw_gets(self) -> int:
        out = run(['ceph', '--admin-daemon', self.cluster.path('run', 'client.rgw.a.asok'),
                   'perf', 'dump', 'rgw'], timeout=60).stdout
        return int(json.loads(out)['rgw']['get'])

    @contextmanager
    def watched(self, res: Result, copier: Callable[[], Tuple[float, int]]) -> Iterator[None]:
        """Around one exec, which sets ``res.execute``: the CPU time and
        faults of the copying process (``copier`` tells them so far), the
        CPU time of the source's server and of the OSDs, the machine's busy
        share and the requests the server saw."""
        u0, d0, h0 = copier(), self.daemon_cpu(), host_busy()
        requests = self.count_requests(res.source)
        yield
        if res.execute:
            res.busy = (host_busy() - h0) / res.execute / CORES
        res.cpu, res.faults = usage_delta(u0, copier())
        d1 = self.daemon_cpu()
        res.server_cpu, res.osd_cpu = d1[0] - d0[0], d1[1] - d0[1]
        res.requests = requests()

    def daemon_cpu(self) -> Tuple[float, float]:
        """CPU seconds so far of the sources' servers (RGW; nginx and its
        workers) and of the OSDs."""
        pids = self.cluster.pids()
        servers = [p for n, p in pids.items() if n in ('nginx', 'client.rgw.a')]
        servers += child_pids([p for n, p in pids.items() if n == 'nginx'])
        return cpu_of(servers), cpu_of([p for n, p in pids.items() if n.startswith('osd.')])

    def count_requests(self, source: Source) -> Callable[[], Optional[int]]:
        """Starts counting the requests the source's server sees; the
        function returned tells how many since (None for a file).  nginx:
        the access log's new lines for this run's folder; RGW: its "get"
        counter."""
        if source.where == 'http':
            log_path = self.cluster.path('out', 'nginx.access.log')
            start = os.path.getsize(log_path)
            needle = ' ' + urlsplit(source.folder_url).path

            def lines() -> Optional[int]:
                with open(log_path, 'rb') as f:
                    f.seek(start)
                    text = f.read().decode(errors='replace')
                return sum(needle in line for line in text.splitlines())
            return lines
        if source.where == 's3':
            before = self.rgw_gets()
            return lambda: self.rgw_gets() - before
        return lambda: None

    def du(self, spec: str) -> int:
        out = json.loads(self.rbd('du', '--format', 'json', spec).stdout)
        return int(sum(i['used_size'] for i in out['images']))

    def verify(self, res: Result, name: str) -> None:
        spec = f'{POOL}/{name}'
        size = int(json.loads(self.rbd('info', '--format', 'json', spec).stdout)['size'])
        res.used = self.du(spec)
        got = self.sha_image(spec)
        res.ok = got == res.source.sha256 and size == res.source.size
        if not res.ok:
            res.error = (f'sha256 {got[:12]} != reference {res.source.sha256[:12]}'
                         if size == res.source.size else
                         f'size {size} != {res.source.size}')

    # -- peers -------------------------------------------------------------
    def ours(self, res: Result, name: str, force: bool) -> None:
        spec = res.source.spec()
        ours: Dict[str, Any] = {'engine': 'adapter'} if force else {}
        if self.hidden:
            ours['live'] = False
        if ours:
            spec['rbd_migration'] = ours
        target = f'{POOL}/{name}'
        prepared, res.prepare = timed(lambda: self.ceph_json(
            'rbd', 'migration', 'prepare', '--import-only', target,
            '--source-spec', json.dumps(spec)))
        res.path = str(prepared.get('path', '?'))
        mgr = self.mgr_pid()
        with self.watched(res, lambda: proc_usage(mgr, family=True)):
            task, res.execute = self.module_task('execute', target)
        if task.get('started') and task.get('finished'):
            res.task = task['finished'] - task['started']
        res.stats = dict(task.get('result') or {})
        _, res.commit = self.module_task('commit', target)

    def qemu(self, res: Result, name: str) -> None:
        dst = f'rbd:{POOL}/{name}:conf={self.conf}'
        # qemu-img 7.2's curl driver now and then stops reading for good,
        # so a remote convert gets a time limit and a stalled one is retried.
        limit = 3600.0 if res.source.where == 'file' else 30 + res.source.size / 50e6
        with self.watched(res, child_usage):
            _, res.execute = timed(lambda: run(
                ['qemu-img', 'convert', '-p', '-m', '16', '-W', '-O', 'raw',
                 res.source.qemu_path(), dst], timeout=limit))

    def librbd(self, res: Result, name: str) -> None:
        spec_path = os.path.join(self.work, f'{name}.json')
        with open(spec_path, 'w') as f:
            json.dump(res.source.spec(), f)
        target = f'{POOL}/{name}'
        try:
            _, res.prepare = timed(lambda: self.rbd(
                'migration', 'prepare', '--import-only', '--source-spec-path', spec_path,
                target))
            with self.watched(res, child_usage):
                _, res.execute = timed(lambda: self.rbd(
                    'migration', 'execute', '--no-progress', target))
            _, res.commit = timed(lambda: self.rbd(
                'migration', 'commit', '--no-progress', target))
        finally:
            os.unlink(spec_path)

    def measure(self, source: Source, peer: str, repeat: int) -> Result:
        res = Result(source, peer)
        if peer == 'librbd' and not source.librbd_reads:
            res.skipped = LIBRBD_CANNOT
            return res
        runner: Callable[[Result, str], None] = {
            'ours/adapter': lambda r, n: self.ours(r, n, force=source.fmt == 'raw'),
            'ours/librbd': lambda r, n: self.ours(r, n, force=False),
            'qemu-img': self.qemu,
            'librbd': self.librbd,
        }[peer]
        best: Optional[Result] = None
        attempts = 0
        while len(res.runs) < repeat and attempts < repeat + STALLS_RETRIED:
            attempts += 1
            one = Result(source, peer)
            name = f'bench-{source.key}-{peer.replace("/", "-")}-{uuid.uuid4().hex[:6]}'
            started, stalled = time.monotonic(), False
            try:
                self.check_room(source.size)
                runner(one, name)
                self.verify(one, name)
            except TimedOut as e:
                one.ok, one.error = False, str(e)
                stalled = peer == 'qemu-img' and source.where != 'file'
                if stalled:
                    res.stalls.append(time.monotonic() - started)
            except BenchError as e:
                one.ok, one.error = False, str(e)
            finally:
                try:
                    self.remove(name)
                except BenchError as e:
                    log(f'cleanup of {POOL}/{name} failed: {e}')
                    one.error = one.error or f'cleanup failed: {e}'
            used, avail = self.df()
            status = 'ok' if one.ok else f'FAILED: {one.error}'
            log(f'{source.label:30} {peer:13} exec {one.execute or 0:6.2f}s  {status}  '
                f'(ceph df: {human(used)} used, {human(avail)} avail)')
            if one.execute is not None and one.ok:
                res.runs.append(one.execute)
            if stalled:
                continue        # a stall says nothing of the import: once more
            if not one.ok:
                one.runs, one.stalls = res.runs, res.stalls
                return one      # a wrong result is the result
            if best is None or (one.execute or 0) < (best.execute or 0):
                best = one
        if best is None:        # a peer that never finished: no row to compare
            res.skipped = f'qemu-img stalled in all {attempts} runs'
            best = res
        best.runs, best.stalls = res.runs, res.stalls
        return best

    def ceiling(self) -> float:
        name = f'bench-ceiling-{uuid.uuid4().hex[:6]}'
        spec = f'{POOL}/{name}'
        try:
            self.rbd('create', '--size', CEILING_TOTAL, spec)
            out = self.rbd('bench', '--io-type', 'write', '--io-size', '4M',
                           '--io-threads', '16', '--io-total', CEILING_TOTAL, spec).stdout
        finally:
            if self.exists(spec):
                self.rbd('rm', '--no-progress', spec)
        return parse_bench(out)


def parse_bench(out: str) -> float:
    """MB/s (10^6) from rbd bench's summary line."""
    m = re.search(r'elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)\s+'
                  r'bytes/sec:\s*([\d.]+)\s*([KMGT]i?B/s)?', out)
    if not m:
        raise BenchError(f'rbd bench: cannot read its summary: {_tail(out, 3)}')
    value, unit = float(m.group(4)), m.group(5)
    scale = {None: 1, 'KiB/s': 1024, 'MiB/s': MiB, 'GiB/s': GiB, 'TiB/s': 1 << 40}[unit]
    return value * scale / 1e6


# --------------------------------------------------------------------------
# Output


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or not b:
        return '-'
    return f'{a / b:.2f}x'


def table(results: List[Result], ceiling: float) -> str:
    by_source: Dict[str, Dict[str, Result]] = {}
    for r in results:
        by_source.setdefault(r.source.key, {})[r.peer] = r
    head = ['source', 'peer', 'prep s', 'exec s', 'task s', 'commit s', 'MB/s', 'req/GiB',
            'task MB/s', 'CPU s', 'faults', 'host busy', 'server CPU s', 'OSD CPU s',
            'CPU floor s',
            'vs file', 'vs qemu-img', 'vs librbd', 'vs ceiling', 'rbd du used', 'src alloc',
            'alloc@4M', 'du/alloc', 'sha256']
    rows: List[List[str]] = []
    for r in results:
        peer = r.peer + (f' ({r.path})' if r.path and r.path not in r.peer else '')
        if r.peer == 'ours/adapter' and r.source.fmt == 'raw':
            peer = 'ours/adapter (forced)'
        if r.skipped:
            rows.append([r.source.label, r.peer, '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-',
                         '-', '-', '-', '-', '-', '-',
                         '-', human(r.source.allocated), human(r.source.allocated_objects),
                         '-', f'skipped: {r.skipped}'])
            continue
        peers = by_source[r.source.key]
        q = peers.get('qemu-img')
        lib = peers.get('librbd')
        on_file = by_source.get(r.source.file_key, {}).get(r.peer)
        mbps = r.mbps
        per_gib = r.requests_per_gib
        fmt = (lambda v: f'{v:.2f}' if v is not None else '-')
        rows.append([
            r.source.label, peer, fmt(r.prepare), fmt(r.execute), fmt(r.task),
            fmt(r.commit),
            f'{mbps:.1f}' if mbps is not None else 'FAILED',
            f'{per_gib:.0f}' if per_gib is not None else '-',
            f'{r.source.size / 1e6 / r.task:.1f}' if (mbps and r.task) else '-',
            fmt(r.cpu), f'{r.faults / 1000:.0f}k' if r.faults is not None else '-',
            f'{100 * r.busy:.0f}%' if r.busy is not None else '-',
            fmt(r.server_cpu) if r.source.where != 'file' else '-', fmt(r.osd_cpu),
            fmt(r.cpu_floor),
            ratio(mbps, on_file.mbps if on_file else None) if mbps else '-',
            ratio(mbps, q.mbps if q else None) if mbps else '-',
            ratio(mbps, lib.mbps if lib else None) if mbps else '-',
            ratio(mbps, ceiling) if mbps else '-',
            human(r.used), human(r.source.allocated), human(r.source.allocated_objects),
            ratio(r.used, r.source.allocated) if r.used is not None else '-',
            'ok' if r.ok else f'FAILED: {r.error}'])
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    left = {0, 1, len(head) - 1}

    def line(row: List[str]) -> str:
        return '  '.join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    out = [line(head), line(['-' * w for w in widths])]
    last = None
    for row in rows:
        if last is not None and row[0] != last:
            out.append('')
        out.append(line(row))
        last = row[0]
    return '\n'.join(out)


# --------------------------------------------------------------------------
# Main


PEERS = {
    'raw': ['qemu-img', 'librbd', 'ours/adapter', 'ours/librbd'],
    'qcow': ['qemu-img', 'librbd', 'ours/adapter'],
    'export-diff': ['librbd', 'ours/adapter'],
    'remote': ['librbd', 'ours/adapter'],
}
SOURCES = ['dense', 'sparse', *(f'{key}{where}' for key in REMOTE_OF
                                for where in ('', '-http', '-s3')), 'http', 's3']
# Without --only; the others (about 10 minutes more at 1 GiB) are asked for.
DEFAULT_SOURCES = ['dense', 'sparse', 'qcow2-z', 'chain', 'http', 's3']
TARGETS = ('every http row >= 0.8x its file row, every s3 row >= 0.6x its file row, '
           '<= 300 req/GiB over http; file rows >= 1.0x qemu-img convert -m 16 -W')


def peers_of(source: Source) -> List[str]:
    """Peers as they read the source: qemu-img where it can."""
    peers = PEERS['remote' if source.where != 'file' and source.fmt == 'raw' else source.fmt]
    return [p for p in peers if p != 'qemu-img' or source.qemu_reads]


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('--dir', default=DEFAULT_DIR,
                   help=f'cluster directory (default {DEFAULT_DIR}); a running cluster '
                        'there is reused (it needs --http), else one is started')
    p.add_argument('--size', type=parse_size, default=GiB, help='virtual size (default 1G)')
    p.add_argument('--keep', action='store_true',
                   help='leave the cluster this run started, and the sources, in place')
    p.add_argument('--repeat', type=int, default=1,
                   help='runs per source and peer; the fastest is shown (default 1)')
    p.add_argument('--only', default='',
                   help='comma-separated sources: ' + ','.join(SOURCES)
                        + ' (default ' + ','.join(DEFAULT_SOURCES) + ')')
    p.add_argument('--adapter-concurrency', type=int,
                   help='set mgr/rbd_migration/adapter_concurrency for the run')
    p.add_argument('--hidden', action='store_true',
                   help='imports librbd cannot read take the hidden path '
                        '("live": false) instead of the live view')
    p.add_argument('--osds', type=int, default=3)
    p.add_argument('--osd-size', type=parse_size, default=5 * GiB)
    args = p.parse_args(argv)
    if args.size < 64 * MiB or args.size % OBJECT:
        p.error('--size: at least 64M and a multiple of 4M')
    only = {s.strip() for s in args.only.split(',') if s.strip()}
    known = set(SOURCES)
    if only - known:
        p.error(f'--only: unknown {", ".join(sorted(only - known))}; known: {", ".join(sorted(known))}')

    def wanted(key: str) -> bool:
        return key in (only or DEFAULT_SOURCES)

    signal.signal(signal.SIGTERM, _on_sigterm)
    t_start = time.monotonic()
    cluster = Cluster(args.dir)
    started = False
    bench: Optional[Bench] = None
    work = os.path.join(cluster.dir, 'bench-work')
    restore: List[Tuple[str, Optional[str]]] = []
    publish: Optional[Publisher] = None
    failed = False
    try:
        if cluster.state and cluster.running():
            log(f'reusing the cluster in {cluster.dir}')
            if not cluster.state.http_port:
                raise BenchError(f'the cluster in {cluster.dir} has no nginx; start it with '
                                 '--http, or give another --dir')
        else:
            if os.path.isdir(cluster.dir) and os.listdir(cluster.dir) and not cluster.state:
                raise BenchError(f'{cluster.dir} exists and holds no cluster; give an empty '
                                 'or new --dir')
            missing = missing_packages(PACKAGES)
            if missing:
                raise BenchError(f'missing packages {" ".join(missing)}; run '
                                 '/usr/bin/python3 qa/cluster.py install')
            log(f'starting a cluster in {cluster.dir}: {args.osds} OSDs x '
                f'{human(args.osd_size)} memstore, RGW, nginx')
            started = True
            cluster.start(osds=args.osds, osd_size=args.osd_size, rgw=True, http=True)
        rgw_port = cluster.ensure_rgw() if any(wanted(k) for k in SOURCES
                                               if k.endswith('s3')) else 0
        state = cluster.state
        assert state and state.http_port and state.http_root
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        bench = Bench(cluster, work)
        bench.hidden = args.hidden
        bench.connect()

        def set_option(name: str, value: str) -> None:
            opt = f'mgr/rbd_migration/{name}'
            r = bench.ceph('config', 'get', 'mgr', opt, check=False)
            old = r.stdout.strip() if r.returncode == 0 else None
            restore.append((opt, old))
            bench.ceph('config', 'set', 'mgr', opt, value)

        r = bench.ceph('config', 'get', 'mgr', ROOTS_OPTION, check=False)
        old_roots = r.stdout.strip() if r.returncode == 0 else ''
        set_option('file_source_roots', ':'.join(filter(None, [old_roots, work])))
        if args.adapter_concurrency:
            set_option('adapter_concurrency', str(args.adapter_concurrency))
        options = {o: bench.ceph('config', 'get', 'mgr', f'mgr/rbd_migration/{o}').stdout.strip()
                   for o in ('adapter_concurrency', 'adapter_bandwidth_mbps',
                             'max_concurrent_tasks')}

        log(f'generating sources of {human(args.size)} in {work}')
        publish = Publisher(state.http_root, state.http_port, rgw_port, bench.conf)
        sources = make_sources(work, args.size, wanted, publish, bench)

        _, cli = timed(lambda: bench.ceph('rbd', 'migration', 'task', 'list'))
        log('measuring the write ceiling (rbd bench)')
        ceilings = [bench.ceiling()]
        results: List[Result] = []
        for source in sources:
            for peer in peers_of(source):
                results.append(bench.measure(source, peer, max(1, args.repeat)))
        ceilings.append(bench.ceiling())
        ceiling = max(ceilings)
        failed = any(r.ok is False for r in results)

        print()
        print(f'rbd_migration import bench: {human(args.size)} virtual, {args.osds} memstore '
              f'OSDs, pool {POOL} (size 1), {os.cpu_count()} CPUs; adapter_concurrency='
              f'{options["adapter_concurrency"]}, adapter_bandwidth_mbps='
              f'{options["adapter_bandwidth_mbps"]}; best of {max(1, args.repeat)}')
        print(f'write ceiling (rbd bench write 4M x16 threads, {CEILING_TOTAL}): '
              + ', '.join(f'{c:.1f}' for c in ceilings) + f' MB/s (using {ceiling:.1f})')
        print()
        print(table(results, ceiling))
        print()
        notes = []
        for s in sources:
            if s.note and s.where == 'file':
                notes.append(f'{s.label}: {s.note}')
        for res in results:
            st = res.stats
            if st:
                notes.append(f'{res.source.label} / {res.peer}: '
                             f'read {human(st.get("bytes_read"))}, '
                             f'wrote {human(st.get("bytes_written"))}, zeroed '
                             f'{human(st.get("bytes_zeroed"))}, skipped '
                             f'{human(st.get("bytes_skipped"))}')
            if len(res.runs) > 1:
                notes.append(f'{res.source.label} / {res.peer}: exec runs '
                             + ', '.join(f'{t:.2f}' for t in res.runs) + ' s')
            if res.stalls:
                notes.append(f'{res.source.label} / {res.peer}: stalled (no answer, '
                             f'killed) in {len(res.stalls)} more runs, after '
                             + ', '.join(f'{t:.0f}' for t in res.stalls) + ' s')
        notes.append(f'one ceph CLI command takes {cli:.2f}s here (not in ours\' exec s: the '
                     'execute command is sent over librados; an operator pays it once)')
        notes.append('alloc@4M: the source\'s allocation counted in whole 4 MiB objects, '
                     'the granularity rbd du (fast-diff) counts in')
        notes.append('CPU s / faults: CPU seconds and minor page faults, during exec, of the '
                     'process that copies (ceph-mgr and its execute child processes for ours, '
                     'else the rbd CLI or qemu-img)')
        notes.append(f'server CPU s / OSD CPU s: the same of the source\'s server (nginx with '
                     f'its workers, RGW) and of the OSDs; CPU floor s: the three over {CORES} '
                     f'cores, the exec time if they kept every core busy: a row whose exec s '
                     f'is near it is bound by this machine\'s cores, and its ratio to another '
                     f'row by their CPU floors')
        notes.append(f'host busy: the machine\'s busy CPU time during exec (every process and '
                     f'the kernel: the copy, the OSDs, the source\'s server) over exec s x '
                     f'{CORES} cores; near 100% the copy is bound by the cores, not by waiting')
        notes.append('req/GiB: requests the source\'s server saw during exec per GiB virtual '
                     '(nginx access log lines; RGW "get" perf counter delta); vs file: MB/s '
                     'over the same peer\'s on the file served')
        notes.append(f'targets: {TARGETS}')
        for n in notes:
            print(f'  * {n}')
        print()
        print(f'runtime {time.monotonic() - t_start:.0f}s'
              + ('; FAILED rows above' if failed else ''))
    except KeyboardInterrupt:
        log('interrupted; cleaning up')
        failed = True
    except BenchError as e:
        log(f'error: {e}')
        failed = True
    finally:
        if bench is not None:
            for opt, old in reversed(restore):
                try:
                    if old:
                        bench.ceph('config', 'set', 'mgr', opt, old)
                    else:
                        cluster.reset_module_option(opt.rsplit('/', 1)[-1])
                except (BenchError, RuntimeError) as e:
                    log(f'restoring {opt}: {e}')
            if publish is not None:
                publish.remove()
            try:
                leftovers = [e['name'] for e in json.loads(bench.rbd(
                    'trash', 'ls', '--all', '--format', 'json', POOL).stdout)
                    if e['name'].startswith('rbd_migration.')]
                leftovers += [n for n in json.loads(bench.rbd(
                    'ls', '--format', 'json', POOL).stdout) if n.startswith('bench-')]
                if leftovers:
                    log(f'left behind in pool {POOL}: {", ".join(leftovers)}')
            except (BenchError, ValueError) as e:
                log(f'checking for leftovers: {e}')
            bench.close()
        if started and not args.keep:
            log(f'stopping the cluster in {cluster.dir}')
            cluster.stop(purge=True)
        elif args.keep:
            log(f'kept: cluster {cluster.dir}, sources in {work}')
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/python3
"""The newer sources against what an operator would use instead.

    qa/bench/new_sources.py [--dir DIR] [--size 1G] [--repeat 2] [--only NAME,...]
                            [--hidden]

Rows (NAME), each imported by the module (``prepare --import-only``,
``execute``, ``commit``: the wall time an operator waits, over librados) and
by its peer, into the same pool, one after the other, each target's sha256
checked against the source's.  Ours takes the module's default path, live
where the module offers it (every row but ``remote``), or with --hidden the
hidden one (``"rbd_migration": {"live": false}``):

  vmdk          a streamOptimized vmdk file     peer: qemu-img convert -m 16 -W to rbd:
  vmdk-http     the same served by nginx        peer: qemu-img convert of the URL
  ova           an OVA holding it (a file)      peer: tar -x, then qemu-img convert
  remote        an image of a second cluster    peer: rbd export | rbd import
                with two snapshots                    (--export-format 2, snapshots kept)
  nbd           the disk as a qcow2 served by   peers: upstream's NBD reading (one
                qemu-nbd --read-only over TCP         request in flight, see serial_nbd),
                                                      and qemu-img convert of nbd://
  nbd-2ms       the raw disk served by nbdkit   the same two
                over TCP, each read and block
                status answered 2 ms late (a
                server some way off)

The disk is --size virtual, half of it random data in 4 MiB pieces spread
over the disk, the rest zeros (VMware's exports are sparse).  MB/s is 10^6
bytes of virtual size per second; the ratio is ours over the peer (above 1:
faster).  ``exec s`` is our execute alone, from sending it to the end the
task records, the ceph CLI's start and the command's round trip included
(0.2 to 0.3 s); ``ours s`` adds the prepare's round trip and the
commit to its recorded end (tasks are polled every POLL s, and their
recorded ends are used, so that the polls cost the import little and their
timing nothing); ``task s`` is its run in the mgr alone, from the task's
start to its end as the task records them (the copy, with the source's and
the target's opening).  The serial NBD reader is a copy alone, its
connection and the target's creation included: compare ``task s``.  Target: >= 1.0 for every row, best of --repeat in one run.  Starts
a cluster (with nginx) under DIR unless one runs there, and for ``remote``
a second one under DIR-other, and for ``nbd`` a qemu-nbd; stops only
what it started.  Prints, asserts nothing.
"""
import argparse
import hashlib
import json
import os
import random
import re
import socket
import threading
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster import Cluster, parse_size  # noqa: E402

MiB = 1 << 20
ROWS = ('vmdk', 'vmdk-http', 'ova', 'remote', 'nbd', 'nbd-2ms')
#: The object and request size of the serial NBD baseline: librbd copies
#: one object per request, our copier one 4 MiB chunk.
OBJECT = 4 * MiB
#: Writes the serial NBD baseline keeps in flight: librbd's deep copy has
#: rbd_concurrent_management_ops (10) objects under way at once.
WRITES_IN_FLIGHT = 10


def log(message: str) -> None:
    print(f'[new_sources {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore


#: Seconds between two polls of a task of ours.
POLL = 0.25


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took, or those it says it took (ours: from the
    ends its tasks record)."""
    start = time.monotonic()
    said = action()
    return said if isinstance(said, float) else time.monotonic() - start


def make_disk(path: str, size: int, seed: int = 1) -> None:
    """Half random data in 4 MiB pieces at random places, zeros elsewhere."""
    rng = random.Random(seed)
    pieces = size // (4 * MiB)
    chosen = sorted(rng.sample(range(pieces), pieces // 2))
    with open(path, 'wb') as f:
        f.truncate(size)
        for index in chosen:
            f.seek(index * 4 * MiB)
            f.write(rng.randbytes(4 * MiB))


def sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(MiB), b''):
            h.update(block)
    return h.hexdigest()


@dataclass
class Row:
    name: str
    peer: str
    size: int
    ours: List[float] = field(default_factory=list)
    theirs: List[float] = field(default_factory=list)
    #: Our executes alone (sent to the task's recorded end).
    execs: List[float] = field(default_factory=list)
    #: Our executes' own runs in the mgr (started to finished, as recorded).
    tasks: List[float] = field(default_factory=list)
    failed: str = ''

    def line(self) -> str:
        if self.failed:
            return f'{self.name:<10} {self.peer:<30} FAILED: {self.failed}'
        best, peer, run = min(self.ours), min(self.theirs), min(self.execs)
        task = min(self.tasks)
        mbs = self.size / 1e6
        return (f'{self.name:<10} {self.peer:<30} {best:7.2f} {mbs / best:8.1f} '
                f'{peer:7.2f} {mbs / peer:8.1f} {peer / best:7.2f}x {run:7.2f} '
                f'{peer / run:7.2f}x {task:7.2f} {peer / task:7.2f}x')


class Bench:
    def __init__(self, cluster: Cluster, work: str, size: int) -> None:
        self.cluster = cluster
        self.work = work
        self.size = size
        assert cluster.state
        self.conf = cluster.state.conf
        #: The last ``ours``'s execute, sent to the task's recorded end,
        #: and the task's own run (started to finished).
        self.last_exec = 0.0
        self.last_task = 0.0
        #: Our imports take the hidden path, not the live view.
        self.hidden = False

    def ceph_json(self, *args: str) -> Dict:
        r = self.cluster.run_ceph(*args, '-f', 'json', timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f'ceph {" ".join(args)}: {r.stderr.strip()}')
        return json.loads(r.stdout)

    def wait(self, task: str) -> Dict:
        """The task once it ended.  Polled every POLL s: the times taken are
        the ends the task records, not when a poll sees them, and polls
        cost the cores the import runs on (a command's validation in this
        process, its answer in the mgr)."""
        while True:
            r = self.cluster.run_ceph('rbd', 'migration', 'task', 'get', task, timeout=60)
            if r.returncode != 11:
                if r.returncode != 0:
                    raise RuntimeError(f'task {task}: {r.stderr.strip()}')
                return dict(self.ceph_json('rbd', 'migration', 'task', 'get', task)['task'])
            time.sleep(POLL)

    def ours(self, spec: Dict, image: str) -> float:
        """Import ``image``: prepare, execute, commit, each sent as the one
        before ends (as the task records its end); seconds in all."""
        target = f'rbd/{image}'
        if self.hidden:
            spec = {**spec, 'rbd_migration': {'live': False}}
        began = time.time()
        self.ceph_json('rbd', 'migration', 'prepare', '--import-only', target,
                       '--source-spec', json.dumps(spec))
        sent = time.time()
        record = self.wait(str(self.ceph_json('rbd', 'migration', 'execute',
                                              target)['task']['id']))
        self.last_exec = record['finished'] - sent
        self.last_task = record['finished'] - record['started']
        committing = time.time()
        commit = self.wait(str(self.ceph_json('rbd', 'migration', 'commit',
                                              target)['task']['id']))
        return (sent - began) + self.last_exec + (commit['finished'] - committing)

    def qemu(self, source: str, image: str, *source_opts: str) -> None:
        sh('qemu-img', 'convert', '-m', '16', '-W', *source_opts, '-O', 'raw', source,
           f'rbd:rbd/{image}:conf={self.conf}')

    def sha(self, image: str, conf: Optional[str] = None) -> str:
        out = sh('rbd', '--conf', conf or self.conf, 'export', '--no-progress', image, '-').stdout
        return hashlib.sha256(out).hexdigest()

    def remove(self, image: str) -> None:
        subprocess.run(['rbd', '--conf', self.conf, 'snap', 'purge', f'rbd/{image}'],
                       capture_output=True)
        subprocess.run(['rbd', '--conf', self.conf, 'rm', '--no-progress', f'rbd/{image}'],
                       capture_output=True)

    def measure(self, row: Row, want: str, ours: Callable[[str], object],
                theirs: Callable[[str], object], repeat: int,
                sha: Optional[Callable[[str], str]] = None,
                also: Sequence[Tuple[Row, Callable[[str], object]]] = ()) -> None:
        """``repeat`` rounds of ours then each peer; the rows ``also``
        names share ``row``'s runs of ours, so every peer is compared with
        the same imports of ours."""
        for _ in range(repeat):
            steps = [(row, row.ours, ours, 'ours'), (row, row.theirs, theirs, row.peer)]
            steps += [(other, other.theirs, action, other.peer) for other, action in also]
            for owner, runs, action, label in steps:
                image = f'bench-{row.name}-{uuid.uuid4().hex[:6]}'
                try:
                    runs.append(timed(lambda: action(image)))
                    if runs is row.ours:
                        row.execs.append(self.last_exec)
                        row.tasks.append(self.last_task)
                    got = (sha or (lambda i: self.sha(f'rbd/{i}')))(image)
                    if got != want:
                        owner.failed = f'{image}: sha256 differs from the source'
                finally:
                    self.remove(image)
                log(f'{row.name}: {label} {runs[-1]:.2f}s')
        for other, _ in also:
            other.ours, other.execs, other.tasks = row.ours, row.execs, row.tasks
            other.failed = other.failed or row.failed


def serial_nbd(uri: str, conf: str, image: str) -> None:
    """Upstream librbd's NBD import (src/librbd/migration/NBDStream.cc),
    its reading mirrored: one libnbd handle, ``base:allocation`` asked for,
    and on one strand, for each object, a block status then a blocking
    pread per data extent, one request in flight at a time; a failed block
    status reads as data.  Its writes, like librbd's deep copy, go out
    asynchronously, WRITES_IN_FLIGHT at most, and zero extents are not
    written (the target is new)."""
    import nbd
    import rados
    import rbd
    handle = nbd.NBD()
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    slots = threading.Semaphore(WRITES_IN_FLIGHT)
    failed: List[int] = []

    def written(completion: 'rbd.Completion') -> None:
        if completion.get_return_value() < 0:
            failed.append(completion.get_return_value())
        slots.release()
    try:
        size = handle.get_size()
        with rados.Rados(conffile=conf) as cluster, cluster.open_ioctx('rbd') as ioctx:
            rbd.RBD().create(ioctx, image, size, old_format=False)
            with rbd.Image(ioctx, image) as target:
                for offset in range(0, size, OBJECT):
                    for start, length in _data_extents(handle, offset,
                                                       min(OBJECT, size - offset)):
                        data = handle.pread(length, start)
                        slots.acquire()
                        target.aio_write(data, start, written)
                for _ in range(WRITES_IN_FLIGHT):
                    slots.acquire()
                target.flush()
        if failed:
            raise RuntimeError(f'{len(failed)} writes failed: {os.strerror(-failed[0])}')
    finally:
        handle.shutdown()   # the handle closes when collected


def _data_extents(handle: object, offset: int, length: int) -> List[Tuple[int, int]]:
    """[offset, offset+length) less what block status calls a hole or zero,
    as upstream's extent callback reads it."""
    import nbd
    holes: List[Tuple[int, int]] = []

    def extent(meta: str, start: int, entries: List[int], err: object) -> int:
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            for size, state in zip(entries[0::2], entries[1::2]):
                if size and state & (nbd.STATE_HOLE | nbd.STATE_ZERO):
                    holes.append((start, start + size))
                start += size
        return 1
    try:
        handle.block_status(length, offset, extent)  # type: ignore[attr-defined]
    except nbd.Error:
        pass
    data, pos, end = [], offset, offset + length
    for start, stop in sorted(holes):
        if start > pos:
            data.append((pos, min(start, end) - pos))
        pos = max(pos, stop)
        if pos >= end:
            break
    if pos < end:
        data.append((pos, end - pos))
    return [(start, n) for start, n in data if n > 0]


def qemu_nbd(image: str, port: int) -> List[str]:
    """A qcow2 served read-only, as qemu-nbd serves a VM's disk."""
    return ['qemu-nbd', '--read-only', '--persistent', '--shared', '8', '-f', 'qcow2',
            '-x', 'disk', '-b', '127.0.0.1', '-p', str(port), image]


def nbdkit_late(raw: str, port: int) -> List[str]:
    """A raw file served read-only with every read and block status
    answered 2 ms late (requests in flight wait side by side)."""
    return ['nbdkit', '--foreground', '--exit-with-parent', '--readonly', '-e', 'disk',
            '-i', '127.0.0.1', '-p', str(port), '--filter=delay', 'file', raw,
            'rdelay=2ms', 'delay-extents=2ms']


def serve_nbd(argv: Callable[[int], List[str]]) -> Tuple[subprocess.Popen, str]:
    """The server ``argv(port)`` on a free loopback port, listening, and
    the URI of its export ``disk``."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    until = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return proc, f'nbd://127.0.0.1:{port}/disk'
        if proc.poll() is not None or time.monotonic() > until:
            proc.kill()
            proc.wait()
            raise RuntimeError(f'{argv(port)[0]} did not listen within 10 s')
        time.sleep(0.05)


def nbd_rows(bench: Bench, name: str, server: Callable[[int], List[str]], want: str,
             repeat: int) -> List[Row]:
    """Imports of ``server``'s export against the serial reader and
    qemu-img, one row each (the same imports of ours in both)."""
    proc, uri = serve_nbd(server)
    serial = Row(name, 'serial libnbd (upstream)', bench.size)
    qemu = Row(name, 'qemu-img convert (nbd://)', bench.size)
    try:
        bench.measure(serial, want, lambda i: bench.ours({'type': 'raw', 'stream': {
            'type': 'nbd', 'uri': uri}}, i), lambda i: serial_nbd(uri, bench.conf, i),
            repeat, also=[(qemu, lambda i: bench.qemu(uri, i, '-f', 'raw'))])
    finally:
        proc.terminate()
        proc.wait(10)
    return [serial, qemu]


def remote_cluster(path: str) -> Tuple[Cluster, bool, str, str]:
    other = Cluster(path)
    started = not other.running()
    if started:
        log(f'starting a second cluster in {path}')
        other.start(osds=3, osd_size=3 << 30)
    assert other.state
    conf = open(other.state.conf).read()
    mon_host = re.search(r'^mon host = (.+)$', conf, re.M).group(1)  # type: ignore[union-attr]
    keyring = open(os.path.join(os.path.dirname(other.state.conf), 'keyring')).read()
    key = re.search(r'\[client\.admin\]\s+key = (\S+)', keyring).group(1)  # type: ignore[union-attr]
    return other, started, mon_host, key


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dir', default='/tmp/rbd-migration-bench-sources')
    p.add_argument('--size', type=parse_size, default=1 << 30)
    p.add_argument('--repeat', type=int, default=2)
    p.add_argument('--only', default=','.join(ROWS))
    p.add_argument('--hidden', action='store_true',
                   help='our imports take the hidden path (the default: live, where offered)')
    args = p.parse_args()
    only = [r for r in args.only.split(',') if r]
    cluster = Cluster(args.dir)
    started = not cluster.running()
    if started:
        log(f'starting a cluster in {args.dir}')
        cluster.start(http=True, osd_size=4 << 30)
    assert cluster.state and cluster.state.http_root
    work = os.path.join(args.dir, 'sources-work')
    os.makedirs(work, exist_ok=True)
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', work)
    other: Optional[Cluster] = None
    other_started = False
    rows: List[Row] = []
    try:
        raw = os.path.join(work, 'disk.raw')
        make_disk(raw, args.size)
        want = sha_file(raw)
        bench = Bench(cluster, work, args.size)
        bench.hidden = args.hidden
        vmdk = os.path.join(work, 'disk.vmdk')
        sh('qemu-img', 'convert', '-f', 'raw', '-O', 'vmdk', '-o',
           'subformat=streamOptimized', raw, vmdk)
        file_spec = {'type': 'vmdk', 'stream': {'type': 'file', 'file_path': vmdk}}
        if 'vmdk' in only:
            row = Row('vmdk', 'qemu-img convert', args.size)
            bench.measure(row, want, lambda i: bench.ours(file_spec, i),
                          lambda i: bench.qemu(vmdk, i), args.repeat)
            rows.append(row)
        if 'vmdk-http' in only:
            served = os.path.join(cluster.state.http_root, 'bench-disk.vmdk')
            os.link(vmdk, served) if not os.path.exists(served) else None
            url = f'http://127.0.0.1:{cluster.state.http_port}/bench-disk.vmdk'
            row = Row('vmdk-http', 'qemu-img convert (URL)', args.size)
            bench.measure(row, want,
                          lambda i: bench.ours({'type': 'vmdk', 'stream': {
                              'type': 'http', 'url': url}}, i),
                          lambda i: bench.qemu(f'json:{json.dumps({"file.driver": "http", "file.url": url, "driver": "vmdk"})}', i),
                          args.repeat)
            rows.append(row)
        if 'ova' in only:
            ova = os.path.join(work, 'vm.ova')
            with open(os.path.join(work, 'vm.ovf'), 'w') as f:
                f.write('<Envelope/>')
            sh('tar', '-C', work, '-cf', ova, 'vm.ovf', 'disk.vmdk')
            unpacked = os.path.join(work, 'unpacked')

            def tar_then_qemu(image: str) -> None:
                os.makedirs(unpacked, exist_ok=True)
                sh('tar', '-C', unpacked, '-xf', ova)
                bench.qemu(os.path.join(unpacked, 'disk.vmdk'), image)
            row = Row('ova', 'tar -x; qemu-img convert', args.size)
            bench.measure(row, want, lambda i: bench.ours({'type': 'ova', 'stream': {
                'type': 'file', 'file_path': ova}}, i), tar_then_qemu, args.repeat)
            rows.append(row)
        if 'remote' in only:
            other, other_started, mon_host, key = remote_cluster(args.dir.rstrip('/') + '-other')
            assert other.state
            oconf = other.state.conf
            name = 'bench-far'
            subprocess.run(['rbd', '--conf', oconf, 'snap', 'purge', f'rbd/{name}'],
                           capture_output=True)
            subprocess.run(['rbd', '--conf', oconf, 'rm', '--no-progress', f'rbd/{name}'],
                           capture_output=True)
            sh('rbd', '--conf', oconf, 'import', '--no-progress', raw, f'rbd/{name}')
            sh('rbd', '--conf', oconf, 'snap', 'create', f'rbd/{name}@one')
            sh('rbd', '--conf', oconf, 'bench', '--io-type', 'write', '--io-total', '64M',
               '--io-pattern', 'rand', f'rbd/{name}')
            sh('rbd', '--conf', oconf, 'snap', 'create', f'rbd/{name}@two')
            far = bench.sha(f'rbd/{name}@two', oconf)
            spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': name,
                    'snap_name': 'two', 'mon_host': mon_host, 'key': key}

            def pipe(image: str) -> None:
                exporter = subprocess.Popen(
                    ['rbd', '--conf', oconf, 'export', '--export-format', '2',
                     '--no-progress', f'rbd/{name}@two', '-'], stdout=subprocess.PIPE)
                sh('rbd', '--conf', bench.conf, 'import', '--export-format', '2',
                   '--no-progress', '-', f'rbd/{image}', stdin=exporter.stdout)
                if exporter.wait() != 0:
                    raise RuntimeError('rbd export failed')
            row = Row('remote', 'rbd export | rbd import', args.size)
            bench.measure(row, far, lambda i: bench.ours(spec, i), pipe, args.repeat)
            rows.append(row)
        qcow2 = os.path.join(work, 'disk.qcow2')
        if 'nbd' in only:
            sh('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2)
        for name, server in (('nbd', lambda port: qemu_nbd(qcow2, port)),
                             ('nbd-2ms', lambda port: nbdkit_late(raw, port))):
            if name in only:
                rows += nbd_rows(bench, name, server, want, args.repeat)
    finally:
        cluster.reset_module_option('file_source_roots')
        if other is not None and other_started:
            other.stop()
        if started:
            cluster.stop()
    print(f'\nnew sources, {args.size / MiB:.0f} MiB virtual (half data), best of '
          f'{args.repeat}; ours = prepare + execute + commit, '
          f'{"hidden" if args.hidden else "live where offered"}; target ratio >= 1.0')
    print(f'{"source":<10} {"peer":<30} {"ours s":>7} {"MB/s":>8} {"peer s":>7} '
          f'{"MB/s":>8} {"ratio":>8} {"exec s":>7} {"ratio":>8} {"task s":>7} {"ratio":>8}')
    for row in rows:
        print(row.line())
    return 1 if any(r.failed for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())

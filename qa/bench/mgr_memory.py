#!/usr/bin/python3
"""What this module costs the ceph-mgr in resident memory.

    qa/bench/mgr_memory.py [--dir DIR] [--inputs raw,raw-http,...] [--size 256M]
                           [--probes 2] [--executes 2] [--status-calls 3]
                           [--snapshots 512] [--snapshot-l1 1M] [--seconds 8]

For each input (a source-spec), on a freshly restarted mgr each time (``ceph
mgr fail``: memory a step freed but the allocator kept would otherwise hide
the next step's cost), it measures the mgr's resident memory (VmRSS) and its
peak (VmHWM, reset through /proc/PID/clear_refs before each step, and a
sampler every 20 ms):

- probes: ``--probes`` ``prepare --import-only`` in a row, each to a new
  target; the growth each leaves behind and its peak over the RSS before it
  (target: 16 MiB per probe, whatever the input);
- status: ``--status-calls`` of ``rbd migration status IMAGE`` on one of
  those targets, then as many of ``rbd migration status`` (which lists them
  all); growth and peak per call (the claim under test: "status of a
  migration whose qcow2 has many snapshots costs hundreds of MiB each time");
- executes: ``--executes`` of those targets executed at once (adapter tasks
  throttled to ``--task-mbps`` so that they keep running), for up to
  ``--seconds``; the peak over the RSS before, per task running at once
  (target: 64 MiB per running execute, whatever the input); then every
  target is aborted, and the RSS after that is printed too.

After each probe and status call the RSS is read once it holds still (1 MiB
over a second, 30 s at most), and the peak is taken until then: a status
whose librbd call outlasts the module's patience answers from the headers
while the call goes on in a thread of the mgr.

Inputs (``--inputs``, comma-separated, all but ``raw-http`` by default;
``probe.path`` of the prepare's answer says which engine serves each):

``raw``          raw file of ``--size`` random bytes (a file source: adapter)
``raw-http``     the same served by nginx (librbd's path)
``s3``           the same in the RGW bucket, keys inline (adapter)
``qcow2-http``   the same as an uncompressed qcow2 over HTTP (librbd's path)
``qcow2-z``      compressible data in a compressed qcow2 file (adapter)
``qcow2-z-http`` the same over HTTP (adapter: groups of chunks in one plan)
``snaps-http``   a qcow2 with ``--snapshots`` internal snapshots whose L1
                 tables are ``--snapshot-l1`` bytes each (4 KiB clusters, the
                 virtual size that makes such an L1), 1 MiB of data, over
                 HTTP: librbd's path while all its L1 tables together stay
                 within ``source_max_metadata_bytes`` (``--snapshot-l1
                 32704``: 513 tables of 32704 bytes, just under 16 MiB), the
                 adapter's past that
``snaps-z-http`` the same with 64 KiB of compressed data: the adapter's path

The snapshotted images are kept under DIR for the next run with the same
parameters (making them takes a minute).  On a 2-core machine the default
run takes about 9 minutes on a running cluster, half of it for
``snaps-http`` when librbd's path serves it.

Prints numbers and ratios to the targets; asserts nothing.  Starts its own
cluster under DIR unless one runs there (it needs nginx, ``--http``, and
for ``s3`` RGW), and stops only what it started.  On the cluster it sets
the module options it needs and the monitors' ``paxos_propose_interval``
(librbd's import prepare allocates a pool snapshot id per source snapshot,
one monitor commit each, a second apart by default: 512 snapshots would
take 9 minutes to prepare), and restores them all at the end.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import rados

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, Cluster, parse_size  # noqa: E402

RUN = uuid.uuid4().hex[:6]
S3_KEY = f'mem-{RUN}/data.raw'
MiB = 1 << 20
EINPROGRESS = 115
PROBE_TARGET, EXECUTE_TARGET = 16 * MiB, 64 * MiB
INPUTS = ('raw', 'raw-http', 's3', 'qcow2-http', 'qcow2-z', 'qcow2-z-http', 'snaps-http',
          'snaps-z-http')
#: All but raw-http (librbd's path, as qcow2-http): the run stays near ten
#: minutes.
DEFAULT_INPUTS = tuple(k for k in INPUTS if k != 'raw-http')
#: Module options this script sets, restored at the end.
OPTIONS = ('file_source_roots', 'max_concurrent_tasks', 'adapter_bandwidth_mbps')
#: Seconds the mgr is left alone after a restart before its RSS is read.
SETTLE = 1.0


def log(msg: str) -> None:
    print(f'[mgr_memory] {msg}', file=sys.stderr, flush=True)


def mib(n: float) -> str:
    return f'{n / MiB:8.1f}'


# --------------------------------------------------------------------------
# The mgr's memory


class MgrMemory:
    """The mgr's resident memory now, and its peak since ``reset_peak``:
    VmHWM when the kernel lets it be reset, and a sampler's maximum either
    way (the mgr's pid changes when it restarts)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._max = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def pid(self) -> int:
        return self.cluster.pids().get('mgr.x', 0)

    def _field(self, name: str, pid: Optional[int] = None) -> int:
        try:
            with open(f'/proc/{pid or self.pid()}/status') as f:
                for line in f:
                    if line.startswith(name + ':'):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def rss(self) -> int:
        return self._field('VmRSS')

    def settled_rss(self, samples: int = 3) -> int:
        """The median of a few readings half a second apart."""
        values = []
        for _ in range(samples):
            values.append(self.rss())
            time.sleep(0.5)
        return int(statistics.median(values))

    def settle(self, least: float = 1.0, most: float = 30.0) -> int:
        """Wait until the RSS holds still (within 1 MiB for a second), at
        least ``least`` and at most ``most`` seconds; return it.  A command
        may leave work running in the mgr after it answers (a status whose
        librbd call outlasted the module's patience goes on in a thread)."""
        began = time.monotonic()
        window: List[int] = []
        while True:
            window = (window + [self.rss()])[-5:]
            waited = time.monotonic() - began
            if waited >= most or (waited >= least and len(window) == 5
                                  and max(window) - min(window) < MiB):
                return window[-1]
            time.sleep(0.25)

    def reset_peak(self) -> int:
        """Start a new peak from now; returns the RSS now."""
        pid = self.pid()
        try:
            with open(f'/proc/{pid}/clear_refs', 'w') as f:
                f.write('5')
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        now = self._field('VmRSS', pid)
        with self._lock:
            self._max = now
        return now

    def peak(self) -> int:
        hwm = self._field('VmHWM') if self._hwm_reset else 0
        with self._lock:
            return max(self._max, hwm)

    def _sample(self) -> None:
        pid, status = 0, None
        while not self._stop.wait(0.02):
            try:
                if status is None:
                    pid = self.pid()
                    status = open(f'/proc/{pid}/status')
                status.seek(0)
                rss = next(int(line.split()[1]) * 1024 for line in status
                           if line.startswith('VmRSS:'))
                with self._lock:
                    self._max = max(self._max, rss)
            except (OSError, StopIteration, ValueError):
                if status is not None:
                    status.close()
                status = None
                time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# --------------------------------------------------------------------------
# Commands


def command(conn: rados.Rados, prefix: str, timeout: float = 900.0,
            **args: Any) -> Tuple[int, str, str, float]:
    """A module command, repeated while it answers EINPROGRESS; (ret, out,
    err, seconds)."""
    cmd = json.dumps(dict(args, prefix=prefix, format='json'))
    began = time.monotonic()
    while True:
        try:
            ret, out, err = conn.mgr_command(cmd, b'', timeout=60)
        except rados.Error as e:
            ret, out, err = -11, b'', str(e)
        if ret not in (-EINPROGRESS, -11) or time.monotonic() - began > timeout:
            text = out.decode(errors='replace') if isinstance(out, bytes) else str(out)
            return ret, text, str(err), time.monotonic() - began
        time.sleep(0.2)


def mon(conn: rados.Rados, prefix: str, **args: Any) -> Tuple[int, str]:
    ret, out, err = conn.mon_command(json.dumps(dict(args, prefix=prefix, format='json')),
                                     b'', timeout=30)
    return ret, out.decode() if ret == 0 else str(err)


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:160] if lines else '(no message)'


def active_gid(conn: rados.Rados) -> int:
    ret, out = mon(conn, 'mgr dump')
    return int(json.loads(out).get('active_gid', 0)) if ret == 0 else 0


def restart_mgr(conn: rados.Rados, mem: MgrMemory) -> int:
    """``ceph mgr fail``, then wait for the module to answer; returns the
    settled RSS of the new mgr."""
    old = active_gid(conn)
    mon(conn, 'mgr fail', who='x')
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if active_gid(conn) in (0, old):
            continue
        try:
            ret, _, _ = conn.mgr_command(json.dumps({'prefix': 'rbd migration task list',
                                                      'format': 'json'}), b'', timeout=10)
        except rados.Error:
            continue
        if ret == 0:
            break
    else:
        raise RuntimeError('the mgr did not come back within 120 s of `ceph mgr fail`')
    # Not a status: on librbd's path it opens every source, which is the
    # cost measured.
    time.sleep(SETTLE)
    return mem.settled_rss()


def wait_idle(conn: rados.Rados, names: List[str], timeout: float = 900.0) -> None:
    """Until no task on ``names`` is active."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ret, out, _, _ = command(conn, 'rbd migration task list', timeout=60)
        if ret == 0:
            active = [t for t in json.loads(out)['tasks'] if t['image_spec'] in names
                      and t['state'] in ('queued', 'running', 'waiting to retry')]
            if not active:
                return
        time.sleep(1)
    log(f'tasks on {names} still active after {timeout:.0f} s')


# --------------------------------------------------------------------------
# Inputs


@dataclass
class Input:
    key: str
    what: str
    spec: Dict[str, Any]


def run(*argv: str, timeout: float = 1800) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)}: {r.stderr.strip()}')


def write_random(path: str, size: int) -> None:
    with open(path, 'wb') as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def write_compressible(path: str, size: int) -> None:
    """Non-zero data deflate squeezes: each 64 KiB repeats 2 KiB of random
    bytes."""
    with open(path, 'wb') as f:
        for _ in range(size // MiB):
            f.write((os.urandom(2048) * 32) * 16)


def snapshotted_qcow2(path: str, snapshots: int, l1_bytes: int, compressed: bool) -> None:
    """A qcow2 of 4 KiB clusters (an L1 entry maps 2 MiB) whose virtual size
    makes an L1 table of ``l1_bytes``, 1 MiB of data, and ``snapshots``
    internal snapshots: QEMU gives each its own copy of the L1 table (64 KiB
    of data when ``compressed``).  Kept
    for the next run with the same parameters."""
    stamp = path + '.json'
    params = {'snapshots': snapshots, 'l1_bytes': l1_bytes, 'compressed': compressed}
    if os.path.exists(path) and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return
    began = time.monotonic()
    for p in (path, stamp):
        if os.path.exists(p):
            os.unlink(p)
    virtual = max(1, l1_bytes // 8) * (2 * MiB)
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', path,
        str(virtual))
    # Compressed, 64 KiB: a host cluster holds many compressed clusters, and
    # its 16-bit refcount counts each once per snapshot.
    write = 'write -c -P 0x5a 0 64k' if compressed else 'write -P 0x5a 0 1M'
    run('qemu-io', '-f', 'qcow2', '-c', write, path)
    opts = f'driver=qcow2,file.filename={path},cache.no-flush=on'
    for i in range(1, snapshots + 1):
        run('qemu-img', 'snapshot', '-c', f'snap{i}', '--image-opts', opts)
    with open(stamp, 'w') as f:
        json.dump(params, f)
    log(f'{os.path.basename(path)}: {snapshots} snapshots of a {virtual >> 30} GiB disk '
        f'(L1 {l1_bytes >> 10} KiB each), {os.path.getsize(path) / MiB:.0f} MiB, '
        f'in {time.monotonic() - began:.0f} s')


def snaps_path(work: str, compressed: bool) -> str:
    return os.path.join(work, f'snaps{"-z" if compressed else ""}.qcow2')


def serve(path: str, http_root: str) -> str:
    """Put ``path`` where nginx serves it; return its name there."""
    name = f'mem-{os.path.basename(path)}'
    dst = os.path.join(http_root, name)
    if os.path.exists(dst):
        os.unlink(dst)
    try:
        os.link(path, dst)
    except OSError:
        shutil.copyfile(path, dst)
    return name


def s3_upload(rgw_port: int, path: str, key: str) -> None:
    import boto3
    from botocore.config import Config
    boto3.client('s3', endpoint_url=f'http://127.0.0.1:{rgw_port}',
                 aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                 region_name='us-east-1',
                 config=Config(s3={'addressing_style': 'path'})).upload_file(
        path, S3_BUCKET, key)


def s3_delete(rgw_port: int, key: str) -> None:
    import boto3
    from botocore.config import Config
    boto3.client('s3', endpoint_url=f'http://127.0.0.1:{rgw_port}',
                 aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                 region_name='us-east-1',
                 config=Config(s3={'addressing_style': 'path'})).delete_object(
        Bucket=S3_BUCKET, Key=key)


def make_inputs(wanted: List[str], work: str, http_root: str, http_port: int,
                rgw_port: int, args: argparse.Namespace) -> List[Input]:
    url = f'http://127.0.0.1:{http_port}'
    size = args.size
    out: List[Input] = []
    data = os.path.join(work, 'data.raw')
    if {'raw', 'raw-http', 's3', 'qcow2-http'} & set(wanted):
        write_random(data, size)
    # The snapshotted images take a minute each to make: both at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(snapshotted_qcow2, snaps_path(work, key == 'snaps-z-http'),
                              args.snapshots, args.snapshot_l1, key == 'snaps-z-http')
                  for key in wanted if key in ('snaps-http', 'snaps-z-http')]:
            f.result()
    for key in wanted:
        human = f'{size / MiB:.0f} MiB'
        if key == 'raw':
            out.append(Input(key, f'raw file, {human} random',
                             {'type': 'raw', 'stream': {'type': 'file', 'file_path': data}}))
        elif key == 'raw-http':
            out.append(Input(key, f'raw over HTTP, {human} random',
                             {'type': 'raw', 'stream': {
                                 'type': 'http', 'url': f'{url}/{serve(data, http_root)}'}}))
        elif key == 's3':
            if not rgw_port:
                log('s3: no RGW in this cluster; skipped')
                continue
            s3_upload(rgw_port, data, S3_KEY)
            out.append(Input(key, f'raw in S3, {human} random', {
                'type': 'raw', 'stream': {
                    'type': 's3', 'url': f'http://127.0.0.1:{rgw_port}/{S3_BUCKET}/{S3_KEY}',
                    'access_key': S3_ACCESS_KEY, 'secret_key': S3_SECRET_KEY}}))
        elif key == 'qcow2-http':
            path = os.path.join(work, 'plain.qcow2')
            run('qemu-img', 'convert', '-O', 'qcow2', data, path)
            out.append(Input(key, f'qcow2 over HTTP, {human} random',
                             {'type': 'qcow', 'stream': {
                                 'type': 'http', 'url': f'{url}/{serve(path, http_root)}'}}))
        elif key in ('qcow2-z', 'qcow2-z-http'):
            path = os.path.join(work, 'compressed.qcow2')
            if not os.path.exists(path):
                plain = os.path.join(work, 'compressible.raw')
                write_compressible(plain, size)
                run('qemu-img', 'convert', '-c', '-O', 'qcow2', plain, path)
                os.unlink(plain)
            on_disk = f'({os.path.getsize(path) / MiB:.0f} MiB on disk)'
            if key == 'qcow2-z':
                out.append(Input(key, f'qcow2 compressed file, {human} {on_disk}',
                                 {'type': 'qcow', 'stream': {'type': 'file',
                                                             'file_path': path}}))
            else:   # the adapter reading consecutive chunks in 16 MiB requests
                out.append(Input(key, f'qcow2 compressed over HTTP, {human} {on_disk}',
                                 {'type': 'qcow', 'stream': {
                                     'type': 'http', 'url': f'{url}/{serve(path, http_root)}'}}))
        elif key in ('snaps-http', 'snaps-z-http'):
            compressed = key == 'snaps-z-http'
            path = snaps_path(work, compressed)
            out.append(Input(key, f'qcow2 over HTTP, {args.snapshots} snapshots x '
                                  f'{args.snapshot_l1 >> 10} KiB L1'
                                  + (', compressed' if compressed else ''),
                             {'type': 'qcow', 'stream': {
                                 'type': 'http', 'url': f'{url}/{serve(path, http_root)}'}}))
    return out


# --------------------------------------------------------------------------
# Measurements


@dataclass
class Calls:
    """Repeated steps: the RSS before the first, after each (once it holds
    still), and each one's peak, until then, over the RSS just before it."""

    before: int = 0
    after: List[int] = field(default_factory=list)
    peaks: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    refused: str = ''

    def growth_per_call(self) -> float:
        return (self.after[-1] - self.before) / len(self.after) if self.after else 0.0

    def steady_growth(self) -> float:
        """Per call after the first: what repeating it keeps adding."""
        if len(self.after) < 2:
            return 0.0
        return (self.after[-1] - self.after[0]) / (len(self.after) - 1)

    def peak_over_before(self) -> int:
        """The highest the RSS went during any call over the RSS before the
        first: what the calls cost at worst, retained or not."""
        return max((a + p for a, p in zip([self.before] + self.after, self.peaks)),
                   default=self.before) - self.before


@dataclass
class Executes:
    before: int = 0
    peak: int = 0
    during: int = 0
    after_abort: int = 0
    most_running: int = 0
    ended: str = ''


@dataclass
class Result:
    inp: Input
    path: str = ''
    probes: Calls = field(default_factory=Calls)
    status_image: Calls = field(default_factory=Calls)
    status_all: Calls = field(default_factory=Calls)
    executes: Optional[Executes] = None
    targets: List[str] = field(default_factory=list)


def repeat(mem: MgrMemory, calls: Calls, n: int,
           step: Callable[[int], Tuple[int, str, str, float]]) -> List[str]:
    """``step(i)`` ``n`` times; returns the answers; stops at a refusal."""
    answers = []
    calls.before = mem.settled_rss()
    for i in range(n):
        mem.reset_peak()
        prior = mem.rss()
        ret, out, err, took = step(i)
        after = mem.settle()
        if ret != 0:
            calls.refused = f'{ret}: {first_line(err or out)}'
            break
        calls.peaks.append(mem.peak() - prior)
        calls.seconds.append(took)
        calls.after.append(after)
        answers.append(out)
    return answers


def measure(conn: rados.Rados, mem: MgrMemory, inp: Input, args: argparse.Namespace) -> Result:
    res = Result(inp)
    spec = json.dumps(inp.spec)
    names = [f'rbd/mem-{RUN}-{inp.key}-{i}' for i in range(args.probes)]

    def prepare(i: int) -> Tuple[int, str, str, float]:
        return command(conn, 'rbd migration prepare', source_image_spec=names[i],
                       import_only=True, source_spec=spec)

    log(f'{inp.key}: {args.probes} probes')
    restart_mgr(conn, mem)
    answers = repeat(mem, res.probes, args.probes, prepare)
    res.targets = names[:len(answers)]
    if answers:
        probe = json.loads(answers[0]).get('probe', {})
        res.path = probe.get('path', '?')
        log(f'{inp.key}: path {res.path}; {probe.get("reasons", [])[:1]}')
    if not res.targets:
        return res
    try:
        if args.status_calls:
            log(f'{inp.key}: {args.status_calls} x status IMAGE, {args.status_calls} x status')
            restart_mgr(conn, mem)
            repeat(mem, res.status_image, args.status_calls,
                   lambda _: command(conn, 'rbd migration status', image_spec=res.targets[0]))
            repeat(mem, res.status_all, args.status_calls,
                   lambda _: command(conn, 'rbd migration status'))
        if args.executes:
            res.executes = execute(conn, mem, res.targets[:args.executes], args.seconds)
    finally:
        log(f'{inp.key}: aborting {len(res.targets)} target(s)')
        for name in res.targets:
            ret, out, err, _ = command(conn, 'rbd migration abort', image_spec=name)
            if ret != 0:
                log(f'abort {name}: {first_line(err or out)}')
        wait_idle(conn, res.targets)
        if res.executes is not None:
            time.sleep(1)
            res.executes.after_abort = mem.settled_rss()
    return res


def execute(conn: rados.Rados, mem: MgrMemory, targets: List[str],
            seconds: float) -> Executes:
    log(f'executing {len(targets)} for up to {seconds:.0f} s')
    ex = Executes(before=restart_mgr(conn, mem))
    mem.reset_peak()
    for name in targets:
        ret, out, err, _ = command(conn, 'rbd migration execute', image_spec=name)
        if ret != 0:
            ex.ended = f'execute {name}: {first_line(err or out)}'
            return ex
    deadline = time.monotonic() + seconds
    states: Dict[str, str] = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        ret, out, _, _ = command(conn, 'rbd migration task list', timeout=60)
        if ret != 0:
            continue
        states = {t['image_spec']: t['state'] for t in json.loads(out)['tasks']
                  if t['action'] == 'execute' and t['image_spec'] in targets}
        running = sum(1 for s in states.values() if s == 'running')
        if running >= ex.most_running:
            ex.most_running = running
            ex.during = mem.rss()
        if states and all(s in ('completed', 'failed', 'cancelled') for s in states.values()):
            break
    ex.peak = mem.peak()
    counts: Dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    ex.ended = ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
    return ex


# --------------------------------------------------------------------------
# Report


def report(results: List[Result], args: argparse.Namespace, idle_drift: int) -> None:
    print(f'\nmgr RSS in MiB; each step on a freshly restarted mgr; idle drift of an '
          f'untouched mgr over 10 s: {idle_drift / MiB:+.1f} MiB')
    print(f'\nprobes: {args.probes} x prepare --import-only '
          f'(target {PROBE_TARGET // MiB} MiB per probe)')
    print(f"{'input':<13} {'path':<8} {'before':>8} {'after':>8} {'growth/probe':>12} "
          f"{'steady':>8} {'peak 1st':>8} {'peak rest':>9} {'x target':>8} {'s/probe':>7}")
    for r in results:
        c = r.probes
        if not c.after:
            print(f'{r.inp.key:<13} refused: {c.refused}')
            continue
        worst = max(c.growth_per_call(), float(max(c.peaks)))
        rest = mib(max(c.peaks[1:])) if len(c.peaks) > 1 else '-'
        print(f'{r.inp.key:<13} {r.path:<8} {mib(c.before)} {mib(c.after[-1])} '
              f'{mib(c.growth_per_call()):>12} {mib(c.steady_growth())} '
              f'{mib(c.peaks[0])} {rest:>9} '
              f'{worst / PROBE_TARGET:7.2f}x {statistics.median(c.seconds):7.1f}'
              + (f'  (then refused: {c.refused})' if c.refused else ''))
    if args.status_calls:
        status_table(results, args)
    if args.executes:
        execute_table(results, args)
    print('\ninputs:')
    for r in results:
        print(f'  {r.inp.key:<13} {r.inp.what}')


def status_table(results: List[Result], args: argparse.Namespace) -> None:
    print(f'\nstatus: {args.status_calls} x `status IMAGE`, then {args.status_calls} x '
          f'`status` (listing all {args.probes} targets of the input)')
    print(f"{'input':<13} {'call':<12} {'before':>8} {'after 1':>8} {'after n':>8} "
          f"{'growth/call':>11} {'steady/call':>11} {'peak/call':>9} {'peak>before':>11} "
          f"{'s/call':>6}")
    for r in results:
        for label, c in (('status IMAGE', r.status_image), ('status', r.status_all)):
            if not c.after:
                continue
            print(f'{r.inp.key:<13} {label:<12} {mib(c.before)} {mib(c.after[0])} '
                  f'{mib(c.after[-1])} {mib(c.growth_per_call()):>11} '
                  f'{mib(c.steady_growth()):>11} {mib(statistics.median(c.peaks)):>9} '
                  f'{mib(c.peak_over_before()):>11} {statistics.median(c.seconds):6.1f}'
                  + (f'  (refused: {c.refused})' if c.refused else ''))


def execute_table(results: List[Result], args: argparse.Namespace) -> None:
    print(f'\nexecutes: {args.executes} at once, for up to {args.seconds:.0f} s '
          f'(target {EXECUTE_TARGET // MiB} MiB per running execute)')
    print(f"{'input':<13} {'path':<8} {'before':>8} {'peak':>8} {'during':>8} "
          f"{'after abort':>11} {'running':>7} {'peak/task':>9} {'x target':>8}  tasks")
    for r in results:
        ex = r.executes
        if ex is None:
            continue
        per_task = (ex.peak - ex.before) / max(1, ex.most_running)
        print(f'{r.inp.key:<13} {r.path:<8} {mib(ex.before)} {mib(ex.peak)} '
              f'{mib(ex.during)} {mib(ex.after_abort):>11} {ex.most_running:>7} '
              f'{mib(per_task):>9} {per_task / EXECUTE_TARGET:7.2f}x  {ex.ended}')


# --------------------------------------------------------------------------


def set_options(cluster: Cluster, conn: rados.Rados, work: str,
                args: argparse.Namespace) -> Optional[str]:
    """Set what the run needs; return the monitors' earlier
    paxos_propose_interval setting (None: not set)."""
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', work)
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/max_concurrent_tasks',
                 str(max(2, args.executes)))
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/adapter_bandwidth_mbps',
                 str(args.task_mbps))
    old = [e['value'] for e in cluster.ceph_json('config', 'dump')
           if e['name'] == 'paxos_propose_interval' and e['section'] == 'mon']
    cluster.ceph('config', 'set', 'mon', 'paxos_propose_interval', '0.05')
    return old[0] if old else None


def restore_options(cluster: Cluster, paxos: Optional[str]) -> None:
    for opt in OPTIONS:
        try:
            cluster.reset_module_option(opt)
        except RuntimeError as e:
            log(f'restoring {opt}: {e}')
    if paxos is None:
        cluster.ceph('config', 'rm', 'mon', 'paxos_propose_interval', check=False)
    else:
        cluster.ceph('config', 'set', 'mon', 'paxos_propose_interval', paxos, check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dir', default='/tmp/rbd-migration-bench-memory')
    p.add_argument('--inputs', default=','.join(DEFAULT_INPUTS),
                   help=f'comma-separated, of {",".join(INPUTS)}')
    p.add_argument('--size', type=parse_size, default=256 * MiB,
                   help='virtual size of the raw and plain qcow2 inputs')
    p.add_argument('--probes', type=int, default=2, help='prepares per input')
    p.add_argument('--executes', type=int, default=2,
                   help='executes at once per input (of the probes\' targets)')
    p.add_argument('--status-calls', type=int, default=3)
    p.add_argument('--snapshots', type=int, default=512,
                   help='internal snapshots of the snaps inputs (the module allows 512)')
    p.add_argument('--snapshot-l1', type=parse_size, default=MiB,
                   help='bytes of each snapshot\'s L1 table (the module allows 16M each; '
                        'librbd holds all of them at once)')
    p.add_argument('--seconds', type=float, default=8.0,
                   help='longest an execute is watched before it is aborted')
    p.add_argument('--task-mbps', type=float, default=16.0,
                   help='adapter_bandwidth_mbps while executes run')
    args = p.parse_args()
    wanted = [k.strip() for k in args.inputs.split(',') if k.strip()]
    unknown = set(wanted) - set(INPUTS)
    if unknown:
        p.error(f'unknown inputs: {", ".join(sorted(unknown))}')
    args.executes = min(args.executes, args.probes)

    began = time.monotonic()
    cluster = Cluster(args.dir)
    started = not cluster.running()
    if started:
        cluster.start(osds=3, osd_size=4 << 30, http=True, rgw='s3' in wanted)
    assert cluster.state
    if not cluster.state.http_port or not cluster.state.http_root:
        log(f'the cluster in {args.dir} has no nginx: start it with --http, or give '
            'another --dir')
        return 1
    rgw_port = cluster.state.rgw_port if 'client.rgw.a' in cluster.pids() else 0
    work = os.path.join(cluster.dir, 'memory-work')
    os.makedirs(work, exist_ok=True)
    conn = rados.Rados(conffile=cluster.state.conf)
    conn.connect(timeout=30)
    mem = MgrMemory(cluster)
    paxos: Optional[str] = None
    served: List[str] = []
    results: List[Result] = []
    try:
        paxos = set_options(cluster, conn, work, args)
        inputs = make_inputs(wanted, work, cluster.state.http_root, cluster.state.http_port,
                             rgw_port, args)
        served = [os.path.join(cluster.state.http_root, n)
                  for n in os.listdir(cluster.state.http_root) if n.startswith('mem-')]
        restart_mgr(conn, mem)
        idle = mem.rss()
        time.sleep(10)
        idle_drift = mem.rss() - idle
        for inp in inputs:
            t = time.monotonic()
            results.append(measure(conn, mem, inp, args))
            log(f'{inp.key}: {time.monotonic() - t:.0f} s')
        report(results, args, idle_drift)
        print(f'\n{time.monotonic() - began:.0f} s in all')
    finally:
        mem.close()
        if not started:
            restore_options(cluster, paxos)
            for path in served:
                if os.path.exists(path):
                    os.unlink(path)
            if rgw_port and 's3' in wanted:
                try:
                    s3_delete(rgw_port, S3_KEY)
                except Exception as e:  # best effort, on the way out
                    log(f'removing s3://{S3_BUCKET}/{S3_KEY}: {e}')
        conn.shutdown()
        if started:
            cluster.stop(purge=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

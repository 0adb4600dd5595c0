#!/usr/bin/python3
"""How long every command takes to answer while everything goes wrong at once.

    qa/bench/command_latency.py [--dir DIR] [--seconds 60] [--probes 40]

The mgr serves this module's commands one at a time, so one command that
waits holds all the others.  For ``--seconds`` this script, at once:

- freezes one OSD (SIGSTOP; resumed on the way out, whatever happens);
- keeps a prepare going whose HTTP source trickles a byte every 0.2 s;
- keeps a prepare going of a crafted qcow2 (an L1 table claiming 64 GiB of
  entries, a snapshot table claiming 65535 snapshots, a backing chain that
  names itself);
- and meanwhile times, through one persistent librados client (so the CLI's
  own start-up is not counted), ``status``, ``status IMAGE``, ``task list``,
  ``task get``, ``task cancel`` and ``abort`` in a loop.

Then, with the OSD resumed, it probes crafted images ``--probes`` times and
reports the mgr's resident memory growth per probe.  It prints p50, p99 and
the worst answer time per command and overall beside the targets (p99 2 s,
worst 10 s; memory 16 MiB per probe); it asserts nothing.  It starts its own
cluster under DIR unless one runs there, and stops only what it started.
"""
import argparse
import http.server
import json
import os
import signal
import socketserver
import struct
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Tuple

import rados

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster import Cluster  # noqa: E402

RUN = uuid.uuid4().hex[:6]
P99_TARGET, WORST_TARGET, PROBE_RSS_TARGET = 2.0, 10.0, 16 << 20


class Trickle(http.server.BaseHTTPRequestHandler):
    """A 1 GiB raw image whose every answer trickles a byte at a time."""

    protocol_version = 'HTTP/1.1'
    stop = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._slow_headers()

    def do_GET(self) -> None:
        self._slow_headers()
        while not self.stop.wait(0.2):
            try:
                self.wfile.write(b'\0')
                self.wfile.flush()
            except OSError:
                return

    def _slow_headers(self) -> None:
        if self.stop.wait(0.5):
            return
        self.send_response(206 if self.command == 'GET' else 200)
        self.send_header('Content-Length', str(1 << 30))
        self.send_header('Accept-Ranges', 'bytes')
        if self.command == 'GET':
            self.send_header('Content-Range', f'bytes 0-{(1 << 30) - 1}/{1 << 30}')
        self.end_headers()


def crafted_qcow2(path: str) -> None:
    """A qcow2 v3 header whose tables claim what no mgr should allocate."""
    header = struct.pack('>4sIQIIQIIQQIIQQQII', b'QFI\xfb', 3, 72, 9, 16,
                         64 << 30,      # virtual size
                         0, 1 << 27,    # crypt method, l1_size: 128 Mi entries
                         1 << 16,       # l1_table_offset
                         1 << 16,       # refcount_table_offset
                         1, 65535,      # refcount clusters, nb_snapshots
                         1 << 17,       # snapshots_offset
                         0, 0, 4, 104)  # features, refcount order, header length
    with open(path, 'wb') as f:
        f.write(header.ljust(1 << 20, b'\xff'))
        f.truncate(4 << 20)


def serve_trickle() -> Tuple[socketserver.ThreadingTCPServer, str]:
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f'http://127.0.0.1:{server.server_address[1]}/disk.raw'


def mgr_rss(cluster: Cluster) -> int:
    pid = cluster.pids().get('mgr.x')
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))


def command(conn: rados.Rados, prefix: str, **args: Any) -> Tuple[int, float]:
    began = time.perf_counter()
    ret, _, _ = conn.mgr_command(json.dumps(dict(args, prefix=prefix, format='json')),
                                 b'', timeout=60)
    return ret, time.perf_counter() - began


def keep_preparing(conn: rados.Rados, spec: Dict[str, Any], stop: threading.Event,
                   counts: Dict[str, int], name: str) -> None:
    """Prepare after prepare of a bad source, each repeated until it answers."""
    n = 0
    while not stop.is_set():
        n += 1
        args = {'source_image_spec': f'rbd/{name}-{RUN}-{n}', 'import_only': True,
                'source_spec': json.dumps(spec)}
        while not stop.is_set():
            ret, _ = command(conn, 'rbd migration prepare', **args)
            counts[name] = counts.get(name, 0) + 1
            if ret != -115:
                break
            time.sleep(0.5)


def measure(conn: rados.Rados, seconds: float, image: str) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {}
    plan = [('status', {}), ('status IMAGE', {'image_spec': image}),
            ('task list', {}), ('task get', {'task_id': '1'}),
            ('task cancel', {'task_id': '999999'}), ('abort', {'image_spec': image})]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, args in plan:
            prefix = 'rbd migration ' + name.replace(' IMAGE', '')
            _, took = command(conn, prefix, **args)
            times.setdefault(name, []).append(took)
    return times


def quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def frozen_osd(cluster: Cluster) -> Iterator[int]:
    """One OSD stopped for the block's duration, resumed whatever happens."""
    name, pid = sorted((n, p) for n, p in cluster.pids().items() if n.startswith('osd.'))[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def probe_rss(cluster: Cluster, conn: rados.Rados, path: str, probes: int) -> float:
    """The mgr's RSS growth per probe of the crafted image, in bytes."""
    spec = json.dumps({'type': 'qcow', 'stream': {'type': 'file', 'file_path': path}})
    command(conn, 'rbd migration prepare', source_image_spec=f'rbd/rss-{RUN}-0',
            import_only=True, source_spec=spec)
    before = mgr_rss(cluster)
    for n in range(probes):
        args = {'source_image_spec': f'rbd/rss-{RUN}-{n}', 'import_only': True,
                'source_spec': spec}
        while command(conn, 'rbd migration prepare', **args)[0] == -115:
            time.sleep(0.2)
    return (mgr_rss(cluster) - before) / max(1, probes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dir', default='/tmp/rbd-migration-bench-latency')
    ap.add_argument('--seconds', type=float, default=60.0)
    ap.add_argument('--probes', type=int, default=40)
    args = ap.parse_args()

    cluster = Cluster(args.dir)
    started = not cluster.running()
    if started:
        cluster.start(osds=3)
    work = os.path.join(args.dir, 'latency-work')
    os.makedirs(work, exist_ok=True)
    crafted = os.path.join(work, 'crafted.qcow2')
    crafted_qcow2(crafted)
    cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', work)
    server, url = serve_trickle()
    conn = rados.Rados(conffile=cluster.state.conf if cluster.state else '')
    conn.connect(timeout=30)
    stop = threading.Event()
    counts: Dict[str, int] = {}
    try:
        image = f'rbd/latency-{RUN}'
        cluster.rbd('create', '--size', '64M', image)
        cluster.ceph('rbd', 'migration', 'prepare', image)
        loads = [threading.Thread(target=keep_preparing, daemon=True, args=(
                     conn, spec, stop, counts, name))
                 for name, spec in (
                     ('trickle', {'type': 'raw', 'stream': {'type': 'http', 'url': url}}),
                     ('crafted', {'type': 'qcow',
                                  'stream': {'type': 'file', 'file_path': crafted}}))]
        for t in loads:
            t.start()
        with frozen_osd(cluster) as pid:
            print(f'OSD pid {pid} frozen; a trickling and a crafted source in prepare; '
                  f'timing commands for {args.seconds:.0f} s', flush=True)
            times = measure(conn, args.seconds, image)
        stop.set()
        Trickle.stop.set()
        for t in loads:
            t.join(30)
        growth = probe_rss(cluster, conn, crafted, args.probes)
    finally:
        stop.set()
        Trickle.stop.set()
        server.shutdown()
        conn.shutdown()
        if started:
            cluster.stop(purge=True)

    everything = [t for ts in times.values() for t in ts]
    print(f"\n{'command':<14} {'calls':>6} {'p50 s':>7} {'p99 s':>7} {'worst s':>8}")
    for name, ts in list(times.items()) + [('all', everything)]:
        print(f'{name:<14} {len(ts):>6} {quantile(ts, 0.5):>7.3f} {quantile(ts, 0.99):>7.3f} '
              f'{max(ts):>8.3f}')
    p99, worst = quantile(everything, 0.99), max(everything)
    print(f'\np99 {p99:.2f} s = {p99 / P99_TARGET:.2f}x its target of {P99_TARGET:g} s; '
          f'worst {worst:.2f} s = {worst / WORST_TARGET:.2f}x its target of {WORST_TARGET:g} s')
    print(f'prepares sent meanwhile: {counts}')
    print(f'mgr RSS growth per probe of the crafted image: {growth / (1 << 20):.2f} MiB '
          f'= {growth / PROBE_RSS_TARGET:.2f}x its target of 16 MiB')
    return 0


if __name__ == '__main__':
    sys.exit(main())

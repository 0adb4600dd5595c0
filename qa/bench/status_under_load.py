#!/usr/bin/python3
"""How ``ceph rbd migration status`` answers while migrations run.

    qa/bench/status_under_load.py [--dir DIR] [--executes 4] [--size 768M] [--rounds 3]

Measures the mgr's answer time for ``rbd migration status`` (through a
persistent librados client, so the CLI's own start-up is not counted), and
as its peer the same reads from a client outside the mgr, with
no migration running, then while N executes run (half in-cluster moves on
librbd's path, half adapter-engine imports), and the mgr's resident memory
before, during and after, over several rounds of migrations (growth across
rounds would be a leak).  Prints p50/p99 and the ratios against idle; asserts
nothing.  Starts its own cluster under DIR unless one runs there, and stops
only what it started.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Dict, List, Tuple

import rados

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from cluster import Cluster, parse_size  # noqa: E402
from rbd_migration.engine.librbd import LibrbdEngine  # noqa: E402

#: Names differ between runs: a run cut short leaves its images behind.
RUN = uuid.uuid4().hex[:6]


def mgr_rss(cluster: Cluster) -> int:
    pid = cluster.pids().get('mgr.x')
    if not pid:
        return 0
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def status_times(conn: rados.Rados, seconds: float,
                 stop: threading.Event) -> Tuple[List[float], List[float]]:
    """Answer times of the module's status and, as the peer, of the same
    reads (pools, trash, migration headers) made by a client outside the
    mgr: what the OSDs' load alone costs."""
    cmd = json.dumps({'prefix': 'rbd migration status', 'format': 'json'})
    peer = LibrbdEngine(conn)
    times, peer_times = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        t = time.perf_counter()
        ret, _, err = conn.mgr_command(cmd, b'')
        if ret != 0:
            raise RuntimeError(f'status failed: {err}')
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer.list_migrations()
        peer_times.append(time.perf_counter() - t)
        time.sleep(0.05)
    return times, peer_times


def pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def start_round(c: Cluster, n: int, size: int, round_no: int, work: str) -> List[str]:
    """Prepare and execute ``n`` migrations; return their target specs."""
    assert c.state
    conf = c.state.conf
    targets = []
    for i in range(n):
        name = f'load-{RUN}-{round_no}-{i}'
        if i % 2 == 0:
            sh('rbd', '--conf', conf, 'create', '--size', f'{size >> 20}M', f'rbd/{name}')
            sh('rbd', '--conf', conf, 'bench', '--io-type', 'write', '--io-size', '4M',
               '--io-total', str(size), f'rbd/{name}')
            c.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
            targets.append(f'rbd2/{name}')
        else:
            path = os.path.join(work, f'{name}.raw')
            with open(path, 'wb') as f:
                for _ in range(size // (4 << 20)):
                    f.write(os.urandom(4 << 20))
            spec = {'type': 'raw', 'stream': {'type': 'file', 'file_path': path},
                    'rbd_migration': {'engine': 'adapter'}}
            c.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                   '--source-spec', json.dumps(spec))
            targets.append(f'rbd/{name}')
    for t in targets:
        c.ceph('rbd', 'migration', 'execute', t)
    return targets


def finish_round(c: Cluster, targets: List[str], work: str) -> None:
    assert c.state
    for t in targets:
        c.ceph('rbd', 'migration', 'abort', t)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not c.ceph_json('rbd', 'migration', 'status')['migrations']:
            break
        time.sleep(1)
    for t in targets:
        pool, name = t.split('/')
        subprocess.run(['rbd', '--conf', c.state.conf, 'rm', '--no-progress', f'rbd/{name}'],
                       capture_output=True)
        path = os.path.join(work, f'{name}.raw')
        if os.path.exists(path):
            os.unlink(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dir', default='/tmp/rbd-migration-bench-status')
    p.add_argument('--executes', type=int, default=4)
    p.add_argument('--size', type=parse_size, default=768 << 20)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--seconds', type=float, default=10.0)
    args = p.parse_args()
    c = Cluster(args.dir)
    started = not c.running()
    if started:
        c.start(osd_size=6 << 30)
    assert c.state
    work = os.path.join(c.dir, 'bench-images')
    os.makedirs(work, exist_ok=True)
    c.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', work)
    c.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/max_concurrent_tasks', str(args.executes))
    # A slow copy keeps the executes running while status is measured.
    c.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/adapter_bandwidth_mbps', '40')
    try:
        with rados.Rados(conffile=c.state.conf) as conn:
            stop = threading.Event()
            idle, peer_idle = status_times(conn, args.seconds, stop)
            rss: Dict[str, List[int]] = {'before': [], 'during': [], 'after': []}
            loaded: List[float] = []
            peer_loaded: List[float] = []
            for r in range(args.rounds):
                rss['before'].append(mgr_rss(c))
                targets = start_round(c, args.executes, args.size, r, work)
                times, peer_times = status_times(conn, args.seconds, stop)
                loaded += times
                peer_loaded += peer_times
                rss['during'].append(mgr_rss(c))
                running = [t for t in c.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
                           if t['state'] == 'running']
                finish_round(c, targets, work)
                rss['after'].append(mgr_rss(c))
                print(f'round {r + 1}: {len(running)} task(s) running at the end of the '
                      f'measurement', flush=True)
        i50, i99 = pct(idle, 50) * 1e3, pct(idle, 99) * 1e3
        l50, l99 = pct(loaded, 50) * 1e3, pct(loaded, 99) * 1e3
        print('\nstatus answer time, ms   p50      p99     (n)')
        print(f'  idle                {i50:7.1f}  {i99:7.1f}   ({len(idle)})')
        print(f'  {args.executes} executes running {l50:7.1f}  {l99:7.1f}   ({len(loaded)})')
        print(f'  ratio loaded/idle   {l50 / i50:7.2f}x {l99 / i99:7.2f}x   '
              f'(target: p99 <= 250 ms and <= 5x idle p99)')
        pi50, pi99 = pct(peer_idle, 50) * 1e3, pct(peer_idle, 99) * 1e3
        pl50, pl99 = pct(peer_loaded, 50) * 1e3, pct(peer_loaded, 99) * 1e3
        print('peer: the same reads from a client outside the mgr')
        print(f'  idle                {pi50:7.1f}  {pi99:7.1f}   ({len(peer_idle)})')
        print(f'  {args.executes} executes running {pl50:7.1f}  {pl99:7.1f}   ({len(peer_loaded)})')
        print(f'  ratio loaded/idle   {pl50 / pi50:7.2f}x {pl99 / pi99:7.2f}x')
        print(f'  module/peer p99     idle {i99 / pi99:.2f}x, loaded {l99 / pl99:.2f}x')
        print('\nmgr RSS, MiB   ' + '  '.join(f'round {i + 1}' for i in range(args.rounds)))
        for phase, values in rss.items():
            print(f'  {phase:7s}     ' + '  '.join(f'{v / 2**20:7.1f}' for v in values))
        if len(rss['after']) > 1:
            growth = (rss['after'][-1] - rss['after'][0]) / 2**20
            print(f'  growth after round 1 to round {args.rounds}: {growth:+.1f} MiB')
        print(f'  mean status p50 idle {statistics.mean(idle) * 1e3:.1f} ms')
    finally:
        for opt in ('file_source_roots', 'max_concurrent_tasks', 'adapter_bandwidth_mbps'):
            c.reset_module_option(opt)
        if started:
            c.stop(purge=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

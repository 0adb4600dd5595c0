#!/usr/bin/python3
"""How status answers grow with the queue: rbd_migration's commands timed
against batches of 10 to 1,000 real (tiny) images, and against prepared
migrations with queued executes.

    qa/bench/queue_scale.py [--dir DIR] [--batch 10,100,1000] [--tasks 10,100]
                            [--repeat 5] [--keep]

Uses the cluster in DIR if one runs there (``qa/cluster.py start --dir DIR``),
else starts one and stops it at the end.  For each batch size N it creates a
pool of N empty 1 MiB images, closes the execute window (so nothing copies
and the queue stays full), runs ``batch prepare`` into a second pool, and
times, through librados (no CLI start-up in the numbers), ``status``,
``batch status``, ``batch status <id>``, ``metrics`` and ``task list``: the
median and the worst of ``--repeat`` answers.  It also reads the bytes the
batch keeps in the mgr's KV store per image.  For each ``--tasks`` size K it
prepares K migrations and queues their executes (held by the closed window)
and times the same commands: librbd's migrations are then really there, and
``status`` reads each one from the cluster.  Everything it creates is
removed (batch cancelled, migrations aborted, pools deleted) and the options
it changes are restored.  Timings are printed, never asserted.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import rados
import rbd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from qa.cluster import Cluster  # noqa: E402

WINDOW = 'mgr/rbd_migration/execute_window'
COMMANDS: List[Tuple[str, Dict[str, Any]]] = [
    ('status', {'prefix': 'rbd migration status'}),
    ('batch status', {'prefix': 'rbd migration batch status'}),
    ('batch status ID', {'prefix': 'rbd migration batch status'}),
    ('metrics', {'prefix': 'rbd migration metrics'}),
    ('task list', {'prefix': 'rbd migration task list'}),
]


def mgr(r: rados.Rados, cmd: Dict[str, Any], inbuf: bytes = b'',
        timeout: float = 300) -> Any:
    ret, out, err = r.mgr_command(json.dumps(dict(cmd, format='json')), inbuf,
                                  timeout=timeout)
    if ret != 0:
        raise RuntimeError(f"{cmd['prefix']}: {err}")
    return json.loads(out) if out else None


def timed(r: rados.Rados, cmd: Dict[str, Any], repeat: int) -> Tuple[float, float, int]:
    """Median and worst seconds of ``repeat`` answers, and the answer's size."""
    times, size = [], 0
    for _ in range(repeat):
        start = time.monotonic()
        ret, out, err = r.mgr_command(json.dumps(dict(cmd, format='json')), b'', timeout=300)
        times.append(time.monotonic() - start)
        if ret != 0:
            raise RuntimeError(f"{cmd['prefix']}: {err}")
        size = len(out)
    return statistics.median(times), max(times), size


def closed_window() -> str:
    hour = time.gmtime().tm_hour
    return f'{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00 UTC'


def make_pools(c: Cluster, r: rados.Rados, src: str, dst: str, images: int) -> None:
    """A source pool of ``images`` empty 1 MiB images and an empty target."""
    for name in (src, dst):
        c.ceph('osd', 'pool', 'create', name, '8')
        c.rbd('pool', 'init', name)
    with r.open_ioctx(src) as io:
        for i in range(images):
            rbd.RBD().create(io, f'img-{i:05d}', 1 << 20)


def drop_pool(c: Cluster, name: str) -> None:
    c.ceph('osd', 'pool', 'delete', name, name, '--yes-i-really-really-mean-it')


def wait_tasks_done(r: rados.Rados, ids: List[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = {t['id']: t for t in mgr(r, COMMANDS[4][1])['tasks']}
        if all(tasks.get(i, {}).get('state') not in ('queued', 'running', 'waiting to retry')
               for i in ids):
            return
        time.sleep(0.5)
    raise RuntimeError(f'tasks still active after {timeout}s')


def batch_series(c: Cluster, r: rados.Rados, n: int, repeat: int) -> Dict[str, Any]:
    src, dst = f'qscale-src-{n}', f'qscale-dst-{n}'
    make_pools(c, r, src, dst, n)
    row: Dict[str, Any] = {'what': f'batch of {n} images'}
    batch_id = None
    try:
        start = time.monotonic()
        created = mgr(r, {'prefix': 'rbd migration batch prepare', 'source_pool_spec': src,
                          'dest_pool_spec': dst})
        row['prepare s'] = time.monotonic() - start
        batch_id = created['batch']['id']
        for label, cmd in COMMANDS:
            if label == 'batch status ID':
                cmd = dict(cmd, batch_id=batch_id)
            row[label] = timed(r, cmd, repeat)
        stored = json.loads(c.ceph('config-key', 'dump', f'mgr/rbd_migration/batch/{batch_id}'))
        row['KV B/image'] = sum(len(v) for v in stored.values()) / n
        row['KV max key B'] = max(len(v) for v in stored.values())
    finally:
        if batch_id:
            mgr(r, {'prefix': 'rbd migration batch cancel', 'batch_id': batch_id})
        drop_pool(c, src)
        drop_pool(c, dst)
    return row


def task_series(c: Cluster, r: rados.Rados, k: int, repeat: int) -> Dict[str, Any]:
    src, dst = f'qscale-tsrc-{k}', f'qscale-tdst-{k}'
    make_pools(c, r, src, dst, k)
    row: Dict[str, Any] = {'what': f'{k} queued executes'}
    prepared: List[str] = []
    tasks: List[str] = []
    try:
        start = time.monotonic()
        for i in range(k):
            spec = f'{dst}/img-{i:05d}'
            mgr(r, {'prefix': 'rbd migration prepare',
                    'source_image_spec': f'{src}/img-{i:05d}', 'dest_image_spec': spec})
            prepared.append(spec)
            tasks.append(mgr(r, {'prefix': 'rbd migration execute',
                                 'image_spec': spec})['task']['id'])
        row['prepare s'] = time.monotonic() - start
        for label, cmd in COMMANDS:
            if label == 'batch status ID':
                continue
            row[label] = timed(r, cmd, repeat)
    finally:
        for task_id in tasks:
            mgr(r, {'prefix': 'rbd migration task cancel', 'task_id': task_id})
        aborts = [mgr(r, {'prefix': 'rbd migration abort', 'image_spec': s})['task']['id']
                  for s in prepared]
        wait_tasks_done(r, aborts)
        drop_pool(c, src)
        drop_pool(c, dst)
    return row


def cell(value: Any) -> str:
    if isinstance(value, tuple):
        return f'{value[0]:.3f}/{value[1]:.3f}s {value[2] // 1024}K'
    if isinstance(value, float):
        return f'{value:.1f}'
    return str(value) if value is not None else '-'


def print_table(rows: List[Dict[str, Any]]) -> None:
    cols = ['what', 'prepare s'] + [label for label, _ in COMMANDS] + ['KV B/image',
                                                                       'KV max key B']
    table = [[cell(row.get(col)) for col in cols] for row in rows]
    widths = [max(len(col), *(len(t[i]) for t in table)) for i, col in enumerate(cols)]
    print('  '.join(col.ljust(w) for col, w in zip(cols, widths)))
    for t in table:
        print('  '.join(v.ljust(w) for v, w in zip(t, widths)))
    print('\ncommand cells: median/worst seconds of the answers, and the JSON answer size')


def sizes(text: str) -> List[int]:
    return [int(x) for x in text.split(',') if x.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dir', default=os.path.join(tempfile.gettempdir(),
                                                 'rbd-migration-queue-bench'))
    p.add_argument('--batch', default='10,100,1000', help='batch sizes, comma-separated')
    p.add_argument('--tasks', default='10,100', help='queued-execute counts; empty: none')
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--keep', action='store_true', help='leave a cluster this run started')
    args = p.parse_args(argv)

    cluster = Cluster(args.dir)
    started = not cluster.running()
    if started:
        cluster.start(osd_size=4 << 30)
    assert cluster.state
    r = rados.Rados(conffile=cluster.state.conf)
    r.connect()
    old = [e['value'] for e in cluster.ceph_json('config', 'dump')
           if e['name'] == WINDOW and e['section'] == 'mgr']
    rows = []
    try:
        cluster.ceph('config', 'set', 'mgr', WINDOW, closed_window())
        time.sleep(2)
        for n in sizes(args.batch):
            rows.append(batch_series(cluster, r, n, args.repeat))
            print(f"batch of {n}: status {cell(rows[-1]['status'])}", flush=True)
        for k in sizes(args.tasks):
            rows.append(task_series(cluster, r, k, args.repeat))
            print(f"{k} queued executes: status {cell(rows[-1]['status'])}", flush=True)
    finally:
        # A running Pacific mgr keeps serving a removed module option's last
        # value: set the old value (or the default) first.
        cluster.ceph('config', 'set', 'mgr', WINDOW, old[0] if old else '')
        if not old:
            cluster.ceph('config', 'rm', 'mgr', WINDOW)
        r.shutdown()
        if started and not args.keep:
            cluster.stop(purge=True)
    print()
    print_table(rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())

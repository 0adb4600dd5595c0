#!/usr/bin/python3
"""The README's demo, through the module's own commands, on the cluster in
DIR: a live migration of an image with snapshots from pool ``rbd`` to pool
``rbd2`` with a new object size, and an import of a raw disk file; progress
is shown while they run and every byte is checked."""
import hashlib
import json
import os
import subprocess
import sys
import time

from cluster import Cluster


def sh(*argv: str, show: bool = True) -> str:
    if show:
        print('$', ' '.join(argv), flush=True)
    # A module command still waiting on the cluster after the module's
    # command_wait answers EINPROGRESS (115) and is repeated for its answer.
    for _ in range(600):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 115:
            break
        time.sleep(0.2)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
    out = r.stdout
    if show and out.strip():
        print(out.rstrip(), flush=True)
    return out


def export_sha(conf: str, spec: str) -> str:
    proc = subprocess.Popen(['rbd', '--conf', conf, 'export', '--no-progress',
                             spec, '-'], stdout=subprocess.PIPE)
    assert proc.stdout
    h = hashlib.sha256()
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b''):  # type: ignore
        h.update(chunk)
    if proc.wait():
        raise RuntimeError(f'rbd export {spec} failed')
    return h.hexdigest()


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def follow(ceph: list, task_id: str) -> None:
    """Print the task's progress as ``ceph progress`` shows it, until done."""
    last = ''
    while True:
        r = subprocess.run([*ceph, 'rbd', 'migration', 'task', 'get', task_id,
                            '-f', 'json'], capture_output=True, text=True)
        if r.returncode == 0:
            print('  ' + json.loads(r.stdout)['message'], flush=True)
            return
        if r.returncode != 11:  # EAGAIN: still active
            raise RuntimeError(r.stderr.strip())
        events = json.loads(sh(*ceph, 'progress', 'json', show=False))['events']
        for ev in events:
            if ev.get('refs', {}).get('origin') == 'rbd_migration' and ev['message'] != last:
                last = ev['message']
                print(f'  ceph progress: {last}', flush=True)
        time.sleep(0.5)


def main() -> int:
    c = Cluster(sys.argv[1])
    assert c.state
    conf = c.state.conf
    rbd = ['rbd', '--conf', conf]
    ceph = ['ceph', '--conf', conf]

    print('\n== A live migration: rbd/vm-disk -> rbd2/vm-disk (8 MiB objects)')
    sh(*rbd, 'create', '--size', '1G', 'rbd/vm-disk')
    sh(*rbd, 'bench', '--io-type', 'write', '--io-size', '4M', '--io-total',
       '256M', '--io-pattern', 'rand', 'rbd/vm-disk')
    sh(*rbd, 'snap', 'create', 'rbd/vm-disk@nightly')
    sh(*rbd, 'bench', '--io-type', 'write', '--io-size', '64K', '--io-total',
       '32M', '--io-pattern', 'rand', 'rbd/vm-disk')
    before = [export_sha(conf, 'rbd/vm-disk@nightly'), export_sha(conf, 'rbd/vm-disk')]
    sh(*ceph, 'rbd', 'migration', 'prepare', 'rbd/vm-disk', 'rbd2/vm-disk',
       '--object-size', '8M')
    task = json.loads(sh(*ceph, 'rbd', 'migration', 'execute', 'rbd2/vm-disk',
                         '-f', 'json', show=False))['task']['id']
    print(f'$ ceph rbd migration execute rbd2/vm-disk   -> task {task}')
    follow(ceph, task)
    sh(*ceph, 'rbd', 'migration', 'status', 'rbd2/vm-disk')
    sh(*rbd, 'status', 'rbd2/vm-disk')
    task = json.loads(sh(*ceph, 'rbd', 'migration', 'commit', 'rbd2/vm-disk',
                         '-f', 'json', show=False))['task']['id']
    print(f'$ ceph rbd migration commit rbd2/vm-disk   -> task {task}')
    follow(ceph, task)
    after = [export_sha(conf, 'rbd2/vm-disk@nightly'), export_sha(conf, 'rbd2/vm-disk')]
    assert before == after, 'data differs after the migration'
    print(f'OK: snapshot and HEAD identical after the move (sha256 {after[1][:16]}…)')

    print('\n== An import-only migration of a raw disk file')
    images = os.path.join(c.dir, 'images')
    os.makedirs(images, exist_ok=True)
    disk = os.path.join(images, 'disk.raw')
    with open(disk, 'wb') as f:
        f.truncate(256 << 20)
        for i in range(0, 256, 16):  # sparse: 1 MiB of data every 16 MiB
            f.seek(i << 20)
            f.write(os.urandom(1 << 20))
    sh(*ceph, 'config', 'set', 'mgr', 'mgr/rbd_migration/file_source_roots', images)
    spec = json.dumps({'type': 'raw', 'stream': {'type': 'file', 'file_path': disk}})
    sh(*ceph, 'rbd', 'migration', 'prepare', '--import-only', 'rbd/imported',
       '--source-spec', spec)
    task = json.loads(sh(*ceph, 'rbd', 'migration', 'execute', 'rbd/imported',
                         '-f', 'json', show=False))['task']['id']
    print(f'$ ceph rbd migration execute rbd/imported   -> task {task}')
    follow(ceph, task)
    task = json.loads(sh(*ceph, 'rbd', 'migration', 'commit', 'rbd/imported',
                         '-f', 'json', show=False))['task']['id']
    follow(ceph, task)
    assert export_sha(conf, 'rbd/imported') == file_sha(disk), 'import differs'
    print('OK: rbd/imported is identical to disk.raw')

    sh(*ceph, 'rbd', 'migration', 'status')
    print(f'\nUse the cluster:  eval "$(/usr/bin/python3 qa/cluster.py env --dir {c.dir})"'
          f'\nStop it:          /usr/bin/python3 qa/cluster.py stop --dir {c.dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

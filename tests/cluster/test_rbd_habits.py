"""What ``rbd migration`` accepts, the module accepts; what librbd 16.2
cannot import, the module routes around.

- ``prepare --import-only POOL/[NS/]IMAGE@SNAP DEST`` (librbd's native
  shorthand) is turned into the native source-spec, with one-line errors
  for a missing image or snapshot;
- a raw import with snapshots whose size is not a multiple of the target's
  object size fails in librbd 16.2's own execute (ERANGE from a file; over
  HTTP a short range read it reports as done); the probe sends it to the
  module's engine, which imports it whole.
"""
import errno
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Dict

import pytest

from qa.cluster import Cluster

MiB = 1 << 20
RUN = uuid.uuid4().hex[:6]


def _task(cluster: Cluster, action: str, image: str) -> None:
    task = cluster.ceph_json('rbd', 'migration', action, image)['task']
    end = cluster.task_end(str(task['id']))
    assert end.returncode == 0, end.stderr


def test_the_native_shorthand_is_accepted(cluster: Cluster) -> None:
    src, dst = f'rbd/habit-src-{RUN}', f'rbd2/habit-dst-{RUN}'
    cluster.rbd('create', '--size', '16M', src)
    cluster.rbd('bench', '--io-type', 'write', '--io-size', '1M', '--io-total', '8M', src)
    cluster.rbd('snap', 'create', f'{src}@s1')
    prepared = cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only',
                                 f'{src}@s1', dst)
    assert prepared['import_only'] and prepared['probe']['type'] == 'native', prepared
    _task(cluster, 'execute', dst)
    _task(cluster, 'commit', dst)
    assert cluster.image_sha(f'{dst}@s1') == cluster.image_sha(f'{src}@s1')


@pytest.mark.parametrize('source, expect', [
    ('rbd/no-such-image-{run}@s1', "no-such-image-{run}"),
    ('rbd/habit-nosnap-{run}@nope', 'nope'),
    ('rbd/habit-nosnap-{run}', 'image@snapshot'),
])
def test_the_shorthand_refuses_in_one_line(cluster: Cluster, source: str,
                                           expect: str) -> None:
    name = f'rbd/habit-nosnap-{RUN}'
    if name.split('/')[1] not in cluster.rbd('ls', 'rbd').split():
        cluster.rbd('create', '--size', '8M', name)
    r = cluster.run_ceph('rbd', 'migration', 'prepare', '--import-only',
                         source.format(run=RUN), f'rbd2/habit-never-{RUN}')
    assert r.returncode in (errno.ENOENT, errno.EINVAL), r.stderr
    line = r.stderr.strip()
    assert line.count('\n') == 0 and 'Traceback' not in line
    assert expect.format(run=RUN) in line, line
    assert f'habit-never-{RUN}' not in cluster.rbd('ls', 'rbd2').split()


@pytest.fixture
def unaligned(cluster: Cluster) -> Dict[str, str]:
    """A 9 MiB raw image and a snapshot of it, served by nginx."""
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'unaligned-{RUN}'
    www.mkdir(exist_ok=True)
    snap, head = os.urandom(9 * MiB), bytearray(os.urandom(9 * MiB))
    head[:MiB] = snap[:MiB]
    (www / 's1.raw').write_bytes(snap)
    (www / 'head.raw').write_bytes(bytes(head))
    base = f'http://127.0.0.1:{cluster.state.http_port}/{www.name}'
    return {'spec': json.dumps({
        'type': 'raw', 'stream': {'type': 'http', 'url': f'{base}/head.raw'},
        'snapshots': [{'type': 'raw', 'name': 's1',
                       'stream': {'type': 'http', 'url': f'{base}/s1.raw'}}]}),
        'head': hashlib.sha256(head).hexdigest(), 's1': hashlib.sha256(snap).hexdigest()}


def test_an_import_librbd_16_2_fails_goes_through_the_module(
        cluster: Cluster, unaligned: Dict[str, str], tmp_path: Path) -> None:
    assert cluster.state
    plain, ours = f'rbd/unaligned-librbd-{RUN}', f'rbd/unaligned-ours-{RUN}'
    spec_file = tmp_path / 'spec.json'
    spec_file.write_text(unaligned['spec'])
    rbd = ['rbd', '--conf', cluster.state.conf]
    # librbd alone: prepare passes; execute fails (ERANGE from a file) or,
    # over HTTP, logs a short range read and still reports done, leaving a
    # target that is not the source.
    subprocess.run([*rbd, 'migration', 'prepare', '--import-only', '--source-spec-path',
                    str(spec_file), plain], check=True, capture_output=True)
    try:
        r = subprocess.run([*rbd, 'migration', 'execute', plain], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 or \
            (cluster.image_sha(f'{plain}@s1'), cluster.image_sha(plain)) != \
            (unaligned['s1'], unaligned['head']), 'librbd imported it whole after all'
    finally:
        subprocess.run([*rbd, 'migration', 'abort', plain], capture_output=True)
    # Through the module: the probe says why, and the import is whole.
    prepared = cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only', ours,
                                 '--source-spec', unaligned['spec'])
    assert prepared['path'] == 'adapter', prepared
    assert any('ERANGE' in reason for reason in prepared['probe']['reasons']), prepared
    _task(cluster, 'execute', ours)
    _task(cluster, 'commit', ours)
    assert cluster.image_sha(f'{ours}@s1') == unaligned['s1']
    assert cluster.image_sha(ours) == unaligned['head']


def _qemu_img(*args: str) -> None:
    subprocess.run(['qemu-img', *args], check=True, capture_output=True)


@pytest.mark.parametrize('kind', ['compressed', 'overlay'])
def test_qcow2_librbd_16_2_gets_wrong_goes_through_the_module(
        cluster: Cluster, roots: Path, kind: str) -> None:
    """Plain librbd cannot import a compressed qcow2 (zeros, or reads that
    fail) and refuses an overlay with a bare EOPNOTSUPP; the module imports
    both whole."""
    assert cluster.state
    raw = roots / f'{kind}.raw'
    raw.write_bytes(b''.join(bytes([n % 251 + 1]) * 65536 for n in range(128)))  # 8 MiB
    image = roots / f'{kind}.qcow2'
    if kind == 'compressed':
        _qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', str(raw), str(image))
    else:
        base = roots / 'base.qcow2'
        _qemu_img('convert', '-f', 'raw', '-O', 'qcow2', str(raw), str(base))
        _qemu_img('create', '-f', 'qcow2', '-F', 'qcow2', '-b', base.name, str(image))
    want = hashlib.sha256(raw.read_bytes()).hexdigest()
    spec = json.dumps({'type': 'qcow', 'stream': {'type': 'file', 'file_path': str(image)}})
    spec_file = roots / f'{kind}.json'
    spec_file.write_text(spec)
    rbd = ['rbd', '--conf', cluster.state.conf]
    plain, ours = f'rbd/{kind}-librbd-{RUN}', f'rbd/{kind}-ours-{RUN}'
    prepared = subprocess.run([*rbd, 'migration', 'prepare', '--import-only',
                               '--source-spec-path', str(spec_file), plain],
                              capture_output=True, text=True)
    if kind == 'overlay':
        assert prepared.returncode != 0 and 'Operation not supported' in prepared.stderr, \
            prepared.stderr
    else:
        try:
            assert prepared.returncode == 0, prepared.stderr
            executed = subprocess.run([*rbd, 'migration', 'execute', '--no-progress', plain],
                                      capture_output=True)
            try:  # zeros where the data was, or no image it can read at all
                whole = executed.returncode == 0 and cluster.image_sha(plain) == want
            except RuntimeError:
                whole = False
            assert not whole, 'librbd imported it whole after all'
        finally:
            subprocess.run([*rbd, 'migration', 'abort', '--no-progress', plain],
                           capture_output=True)
    answer = cluster.ceph_json('rbd', 'migration', 'prepare', '--import-only', ours,
                               '--source-spec', spec)
    reason = 'compressed clusters' if kind == 'compressed' else 'backing file'
    assert answer['path'] == 'adapter' and any(
        reason in r for r in answer['probe']['reasons']), answer
    _task(cluster, 'execute', ours)
    _task(cluster, 'commit', ours)
    assert cluster.image_sha(ours) == want


def test_a_stripe_unit_above_the_inherited_object_size_is_named(cluster: Cluster) -> None:
    """librbd refuses it with a bare EINVAL; the module names the option,
    the object size the target would inherit, and the fix, and creates
    nothing."""
    src, dst = f'rbd/habit-stripe-{RUN}', f'rbd2/habit-stripe-dst-{RUN}'
    cluster.rbd('create', '--size', '8M', '--object-size', '1M', src)
    r = cluster.run_ceph('rbd', 'migration', 'prepare', src, dst,
                         '--stripe_unit', '2M', '--stripe_count', '2')
    assert r.returncode == errno.EINVAL, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith(
        "--stripe-unit: 2097152 is larger than the object size (1048576, the "
        "source's); give a smaller --stripe-unit or a larger --object-size"), r.stderr
    assert dst.split('/')[1] not in cluster.rbd('ls', 'rbd2').split()
    assert src.split('/')[1] in cluster.rbd('ls', 'rbd').split()

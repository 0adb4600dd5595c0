"""An NBD source through the module: a qcow2 served by ``qemu-nbd`` as raw,
imported over TCP and over a unix socket under file_source_roots, and
compared byte for byte with ``qemu-img convert``."""
import hashlib
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import pytest

from qa.cluster import Cluster
from tests.clusterops import mig, wait_task

pytestmark = pytest.mark.skipif(not shutil.which('qemu-nbd'), reason='needs qemu-nbd')

#: Longest wait for qemu-nbd to listen, or to exit once killed.
START_LIMIT = 10.0


def _qcow2(path: Path) -> Path:
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', str(path), '24M'], check=True)
    subprocess.run(['qemu-io', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0x11 17M 64k',
                    str(path)], check=True, capture_output=True)
    return path


def _listening(address: Union[str, Tuple[str, int]], family: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(address) == 0


@pytest.fixture
def serve() -> Iterator[Callable[..., None]]:
    """Starts qemu-nbd for a test; each is killed at the end."""
    procs = []

    def start(image: Path, sock: Optional[Path] = None, port: int = 0) -> None:
        where = ['--socket', str(sock)] if sock else ['-b', '127.0.0.1', '-p', str(port)]
        proc = subprocess.Popen(['qemu-nbd', '--read-only', '--persistent', '--shared', '8',
                                 '-f', 'qcow2', '-x', 'disk', *where, str(image)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        address: Union[str, Tuple[str, int]] = str(sock) if sock else ('127.0.0.1', port)
        family = socket.AF_UNIX if sock else socket.AF_INET
        until = time.monotonic() + START_LIMIT
        while not _listening(address, family):
            assert proc.poll() is None and time.monotonic() < until, 'qemu-nbd did not start'
            time.sleep(0.05)
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(START_LIMIT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def _sha_rbd(cluster: Cluster, spec: str) -> str:
    assert cluster.state
    out = subprocess.run(['rbd', '--conf', cluster.state.conf, 'export', '--no-progress',
                          spec, '-'], capture_output=True, check=True).stdout
    return hashlib.sha256(out).hexdigest()


def _import(cluster: Cluster, uri: str, want: str) -> None:
    name = f'nbd-{uuid.uuid4().hex[:8]}'
    spec = {'type': 'raw', 'stream': {'type': 'nbd', 'uri': uri}}
    prepared = mig(cluster, 'prepare', '--import-only', f'rbd/{name}',
                   '--source-spec', json.dumps(spec))
    assert prepared['path'] == 'adapter', prepared
    for step in ('execute', 'verify', 'commit'):   # verify reads the source again
        wait_task(cluster, str(mig(cluster, step, f'rbd/{name}')['task']['id']))
    assert _sha_rbd(cluster, f'rbd/{name}') == want


def test_qcow2_over_nbd_imports_as_raw(cluster: Cluster, roots: Path,
                                       serve: Callable[..., None]) -> None:
    image = _qcow2(roots / 'disk.qcow2')
    raw = roots / 'disk.raw'
    subprocess.run(['qemu-img', 'convert', '-O', 'raw', str(image), str(raw)], check=True)
    want = hashlib.sha256(raw.read_bytes()).hexdigest()
    port = _free_port()
    serve(image, port=port)
    _import(cluster, f'nbd://127.0.0.1:{port}/disk', want)
    sock = roots / 'q.sock'
    if len(str(sock)) < 100:        # a unix socket's path has 107 bytes at most
        serve(image, sock=sock)
        _import(cluster, f'nbd+unix:///disk?socket={sock}', want)

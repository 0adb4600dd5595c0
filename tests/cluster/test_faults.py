"""Faults injected into real daemons and servers while migrations run.

For each: the migration either completes with every snapshot and HEAD
equal, or stops in a visible error state with a one-line reason from which
abort restores the source or a retry completes it.  Each fault is repeated a
few times; loops are sized to stay well inside CI's time.
"""
import hashlib
import http.server
import json
import os
import random
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional, Set

import pytest
import rados

from qa.cluster import Cluster
from tests.profile import rounds
from rbd_migration.engine.librbd import LibrbdEngine
from rbd_migration.images import ImageSpec
from tests.netfaults import reset

ROUNDS = rounds(quick=1, thorough=6)


def _ceph(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, timeout=120)


def _task(cluster: Cluster, *command: str) -> str:
    return str(cluster.ceph_json('rbd', 'migration', *command)['task']['id'])


@pytest.fixture
def slow(cluster: Cluster) -> Iterator[None]:
    """Executes that take seconds, not milliseconds, so faults land mid-copy;
    quick retries so recovery is quick."""
    opts = {'adapter_bandwidth_mbps': '10', 'retry_backoff': '1', 'retry_max_backoff': '4'}
    for k, v in opts.items():
        cluster.ceph('config', 'set', 'mgr', f'mgr/rbd_migration/{k}', v)
    yield
    for k in opts:
        cluster.reset_module_option(k)


def _source_image(cluster: Cluster, name: str, size_mb: int = 192) -> Dict[str, str]:
    cluster.rbd('create', '--size', f'{size_mb}M', f'rbd/{name}')
    cluster.rbd('bench', '--io-type', 'write', '--io-size', '4M', '--io-total',
         f'{size_mb // 2}M', '--io-pattern', 'rand', f'rbd/{name}')
    cluster.rbd('snap', 'create', f'rbd/{name}@s1')
    cluster.rbd('bench', '--io-type', 'write', '--io-size', '4M', '--io-total',
         f'{size_mb // 2}M', '--io-pattern', 'rand', f'rbd/{name}')
    return {'s1': cluster.image_sha(f'rbd/{name}@s1'), 'HEAD': cluster.image_sha(f'rbd/{name}')}


def _cleanup(cluster: Cluster, *specs: str) -> None:
    assert cluster.state
    for spec in specs:
        _ceph(cluster, 'rbd', 'migration', 'abort', spec)
    time.sleep(1)
    for spec in specs:
        subprocess.run(['rbd', '--conf', cluster.state.conf, 'snap', 'purge', spec],
                       capture_output=True)
        subprocess.run(['rbd', '--conf', cluster.state.conf, 'rm', '--no-progress', spec],
                       capture_output=True)


def test_mgr_killed_during_execute_commit_and_abort(cluster: Cluster) -> None:
    """kill -9 of the mgr mid-execute: the restarted mgr resumes the task;
    `mgr fail` right after commit and abort are queued: they finish."""
    for round_no in range(ROUNDS):
        name = f'fault-mgr-{round_no}-{uuid.uuid4().hex[:4]}'
        sums = _source_image(cluster, name, 256)
        cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
        try:
            task = _task(cluster, 'execute', f'rbd2/{name}')
            time.sleep(random.uniform(0.2, 1.0))
            cluster.kill_daemon('mgr.x')
            cluster.start_daemon('mgr.x')
            assert cluster.task_end(task).returncode == 0
            if round_no % 2 == 0:
                commit = _task(cluster, 'commit', f'rbd2/{name}')
                cluster.ceph('mgr', 'fail')
                cluster.wait_module()
                assert cluster.task_end(commit).returncode == 0
                assert cluster.image_sha(f'rbd2/{name}@s1') == sums['s1']
                assert cluster.image_sha(f'rbd2/{name}') == sums['HEAD']
            else:
                abort = _task(cluster, 'abort', f'rbd2/{name}')
                cluster.ceph('mgr', 'fail')
                cluster.wait_module()
                assert cluster.task_end(abort).returncode == 0
                assert cluster.image_sha(f'rbd/{name}@s1') == sums['s1']
                assert cluster.image_sha(f'rbd/{name}') == sums['HEAD']
        finally:
            _cleanup(cluster, f'rbd2/{name}', f'rbd/{name}')


def _pool_objects(cluster: Cluster, pool: str) -> int:
    """Objects in the pool, counted (``ceph df`` lags behind deletions of
    earlier tests, which could put the quota out of reach)."""
    assert cluster.state
    out = subprocess.run(['rados', '--conf', cluster.state.conf, '-p', pool, 'ls'],
                         capture_output=True, text=True, check=True).stdout
    return len(out.split())


def _settled_objects(cluster: Cluster, pool: str) -> int:
    """Objects in the pool once the count holds still for 2 s (60 s at
    most): objects of earlier tests' images may still be going, and a quota
    set above them would then never be reached (the copy completed
    unstalled once)."""
    count = _pool_objects(cluster, pool)
    until = time.monotonic() + 60
    while time.monotonic() < until:
        time.sleep(2)
        again = _pool_objects(cluster, pool)
        if again == count:
            break
        count = again
    return count


def _quota_full(cluster: Cluster, pool: str) -> bool:
    detail = cluster.ceph_json('osd', 'pool', 'ls', 'detail')
    return 'full_quota' in next(p for p in detail if p['pool_name'] == pool)['flags_names']


def _assert_stalled_on_quota(cluster: Cluster, spec: str) -> None:
    # "no progress" first, the cause once the pool's flags are re-read
    checks = cluster.health_mentioning('reached its quota (max_objects',
                                       check='RBD_MIGRATION_STALLED', timeout=240)
    detail = ' '.join(d['message'] for d in
                      checks.get('RBD_MIGRATION_STALLED', {}).get('detail', []))
    assert f'{spec} (task' in detail and 'reached its quota (max_objects' in detail, checks
    assert 'ceph osd pool set-quota rbd2 max_objects' in detail
    # Objects of images earlier tests removed may still be going (snapshot
    # trimming runs in the background), so the pool can drop below its
    # quota for a moment and the task move on a little: look until it shows.
    shown: Dict[str, str] = {}

    def stalled_everywhere() -> bool:
        shown['tasks'] = cluster.ceph('rbd', 'migration', 'task', 'list')
        mig = cluster.ceph_json('rbd', 'migration', 'status', spec)['migrations'][0]
        shown['state_text'] = mig['state_text']
        return ('stalled: pool rbd2 reached its quota' in shown['tasks']
                and 'stalled' in shown['state_text'])
    try:
        cluster._wait(f'{spec} shown stalled on the quota', stalled_everywhere, 90)
    except RuntimeError as e:
        raise AssertionError(f'{e}; last seen: {shown}') from None


@pytest.mark.parametrize('path', ['adapter', 'librbd'])
def test_target_pool_quota_reached(cluster: Cluster, path: str) -> None:
    """Writes wait, without a word, while the target pool is at its quota:
    the task is reported stalled, naming the quota and the command that
    lifts it, and completes once the quota is raised.  The adapter's copy,
    held to 5 MB/s, meets the quota mid-copy; librbd's copy is faster than
    the monitors flag a pool full, so its execute is queued on a pool
    already full."""
    assert cluster.state and cluster.state.http_root
    opts = {'stall_warning_after': '3', 'adapter_bandwidth_mbps': '5'}
    for k, v in opts.items():
        cluster.ceph('config', 'set', 'mgr', f'mgr/rbd_migration/{k}', v)
    name = f'fault-quota-{path}-{uuid.uuid4().hex[:4]}'
    www = Path(cluster.state.http_root) / f'{name}.raw'
    try:
        if path == 'librbd':
            sums = _source_image(cluster, name, 128)
            cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
            limit = 1  # reached at once: the pool holds rbd_directory and more
        else:
            data = os.urandom(96 << 20)
            www.write_bytes(data)
            sums = {'HEAD': hashlib.sha256(data).hexdigest()}
            spec = {'type': 'raw', 'rbd_migration': {'engine': 'adapter'},
                    'stream': {'type': 'http',
                               'url': f'http://127.0.0.1:{cluster.state.http_port}/{www.name}'}}
            cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd2/{name}',
                         '--source-spec', json.dumps(spec))
            limit = _settled_objects(cluster, 'rbd2') + 8
        cluster.ceph('osd', 'pool', 'set-quota', 'rbd2', 'max_objects', str(limit))
        if path == 'librbd':
            cluster._wait('rbd2 at its quota', lambda: _quota_full(cluster, 'rbd2'), 60)
        task = _task(cluster, 'execute', f'rbd2/{name}')
        _assert_stalled_on_quota(cluster, f'rbd2/{name}')
        cluster.ceph('osd', 'pool', 'set-quota', 'rbd2', 'max_objects', '0')
        assert cluster.task_end(task).returncode == 0
        cluster.health_mentioning(f'rbd2/{name}', check='RBD_MIGRATION_STALLED',
                                  present=False)
        assert cluster.task_end(_task(cluster, 'commit', f'rbd2/{name}')).returncode == 0
        if 's1' in sums:
            assert cluster.image_sha(f'rbd2/{name}@s1') == sums['s1']
        assert cluster.image_sha(f'rbd2/{name}') == sums['HEAD']
    finally:
        cluster.ceph('osd', 'pool', 'set-quota', 'rbd2', 'max_objects', '0')
        for k in opts:
            cluster.reset_module_option(k)
        _cleanup(cluster, f'rbd2/{name}', f'rbd/{name}')
        www.unlink(missing_ok=True)


def test_status_answers_on_a_pool_that_just_filled(cluster: Cluster) -> None:
    """librbd's migration_status waits for a write on a full pool.  The
    engine reads the pool flags at most every few seconds, so a pool can
    fill up unseen: the status then comes from the image headers after a
    few seconds, and at once while that librbd call still waits."""
    assert cluster.state
    name = f'fault-justfull-{uuid.uuid4().hex[:4]}'
    _source_image(cluster, name, 16)
    cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
    try:
        cluster.ceph('osd', 'pool', 'set-quota', 'rbd2', 'max_objects', '1')
        cluster._wait('rbd2 at its quota', lambda: _quota_full(cluster, 'rbd2'), 60)
        with rados.Rados(conffile=cluster.state.conf) as conn:
            engine = LibrbdEngine(conn)
            engine.STATUS_PATIENCE = 2.0
            engine._full_checked = float('inf')  # flags "read" just before
            for _ in range(2):
                started = time.monotonic()
                info = engine.status(ImageSpec('rbd2', '', name))
                assert time.monotonic() - started < 30
                assert (info.state, str(info.source)) == ('prepared', f'rbd/{name}')
            assert engine._waiting, 'librbd answered on a full pool: nothing tested'
    finally:
        cluster.ceph('osd', 'pool', 'set-quota', 'rbd2', 'max_objects', '0')
        _cleanup(cluster, f'rbd2/{name}', f'rbd/{name}')

def test_osd_frozen_and_marked_down_during_execute(cluster: Cluster, slow: None) -> None:
    """An OSD stops answering (SIGSTOP), is marked down, and comes back
    (SIGCONT): librbd's I/O waits and is resent; the execute completes.
    (A restart of the process would be the same to the migration, but
    memstore OSDs lose their data when restarted, so the test freezes it.)"""
    for round_no in range(ROUNDS):
        name = f'fault-osd-{round_no}-{uuid.uuid4().hex[:4]}'
        sums = _source_image(cluster, name, 128)
        cluster.ceph('rbd', 'migration', 'prepare', f'rbd/{name}', f'rbd2/{name}')
        try:
            task = _task(cluster, 'execute', f'rbd2/{name}')
            time.sleep(1)
            osd = f'osd.{round_no % 3}'
            pid = cluster.pids()[osd]
            os.kill(pid, 19)  # SIGSTOP
            try:
                time.sleep(3)
                cluster.ceph('osd', 'down', osd)
                time.sleep(2)
            finally:
                os.kill(pid, 18)  # SIGCONT
            assert cluster.task_end(task).returncode == 0
            _wait_clean(cluster)
            assert cluster.task_end(_task(cluster, 'commit', f'rbd2/{name}')).returncode == 0
            assert cluster.image_sha(f'rbd2/{name}@s1') == sums['s1']
            assert cluster.image_sha(f'rbd2/{name}') == sums['HEAD']
        finally:
            _cleanup(cluster, f'rbd2/{name}', f'rbd/{name}')


def _wait_clean(cluster: Cluster) -> None:
    deadline = time.monotonic() + 60
    while not cluster.pgs_clean() and time.monotonic() < deadline:
        time.sleep(0.5)


class FaultyProxy:
    """A loopback HTTP proxy in front of nginx that, while ``faults`` is on,
    answers some requests with 503, resets some connections and truncates
    some bodies; and that can be stopped and started like a server.

    The faults come in a fixed turn between good answers, so every round
    that makes a handful of requests meets each kind (drawn at random, a
    copy of few large reads could miss one)."""

    TURN = ('', '503', '', 'reset', '', 'truncated')

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = False
        self.counts = {'503': 0, 'reset': 0, 'truncated': 0, 'ok': 0}
        self.port = _free_port()
        self.server: Optional[socketserver.ThreadingTCPServer] = None
        self.connections: Set[socket.socket] = set()
        self._turn = 0
        self._turn_lock = threading.Lock()
        self.start()

    def next_fault(self) -> str:
        with self._turn_lock:
            self._turn += 1
            return self.TURN[self._turn % len(self.TURN)]

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                proxy.connections.add(self.connection)

            def finish(self) -> None:
                proxy.connections.discard(self.connection)
                try:
                    super().finish()
                except (OSError, ValueError):
                    pass  # reset, or cut by stop()

            def _forward(self, head: bool) -> None:
                fault = proxy.next_fault() if proxy.faults else ''
                if fault == '503':
                    proxy.counts['503'] += 1
                    self.send_response(503)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                if fault == 'reset':
                    proxy.counts['reset'] += 1
                    reset(self)
                    return
                req = urllib.request.Request(proxy.upstream + self.path,
                                             method='HEAD' if head else 'GET')
                if self.headers.get('Range'):
                    req.add_header('Range', self.headers['Range'])
                with urllib.request.urlopen(req) as up:
                    body = b'' if head else up.read()
                    self.send_response(up.status)
                    for k in ('Content-Range', 'Accept-Ranges', 'Content-Type'):
                        if up.headers.get(k):
                            self.send_header(k, up.headers[k])
                    self.send_header('Content-Length',
                                     up.headers.get('Content-Length') if head else str(len(body)))
                    self.end_headers()
                    if fault == 'truncated' and len(body) > 1:
                        proxy.counts['truncated'] += 1
                        self.wfile.write(body[:len(body) // 2])
                        self.close_connection = True
                        return
                    proxy.counts['ok'] += 1
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward(False)

            def do_HEAD(self) -> None:
                self._forward(True)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(('127.0.0.1', self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """No new connections, and the open ones cut, as when a server goes
        away."""
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


@pytest.fixture
def proxied_image(cluster: Cluster) -> Iterator[Dict[str, object]]:
    assert cluster.state and cluster.state.http_root
    www = Path(cluster.state.http_root) / f'faults-{uuid.uuid4().hex[:6]}'
    www.mkdir()
    # Dense: at the slow fixture's 10 MB/s the copy takes about 10 s, so the
    # fault lands mid-copy even when a first read is held up for a while.
    data = os.urandom(96 << 20)
    (www / 'disk.raw').write_bytes(data)
    proxy = FaultyProxy(f'http://127.0.0.1:{cluster.state.http_port}')
    yield {'proxy': proxy, 'url': f'http://127.0.0.1:{proxy.port}/{www.name}/disk.raw',
           'sha': hashlib.sha256(data).hexdigest()}
    proxy.stop()
    for f in www.iterdir():
        f.unlink()
    www.rmdir()


def test_http_source_faults_and_server_restarts(cluster: Cluster, slow: None,
                                                proxied_image: Dict[str, object]) -> None:
    """503s, resets and truncated bodies are retried; a server that goes away
    for a while fails the attempt, and the task's retry resumes the copy."""
    proxy = proxied_image['proxy']
    assert isinstance(proxy, FaultyProxy)
    # Faults come in turn between good answers: every round sees each kind.
    for round_no in range(max(ROUNDS, 3)):
        name = f'fault-http-{round_no}-{uuid.uuid4().hex[:4]}'
        spec = {'type': 'raw', 'stream': {'type': 'http', 'url': proxied_image['url']},
                'rbd_migration': {'engine': 'adapter'}}
        cluster.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                     '--source-spec', json.dumps(spec))
        try:
            proxy.faults = True
            task = _task(cluster, 'execute', f'rbd/{name}')
            cluster.task_running(task)
            proxy.stop()
            time.sleep(random.uniform(2, 5))
            proxy.start()
            r = cluster.task_end(task)
            proxy.faults = False
            assert r.returncode == 0, r.stderr
            tasks = cluster.ceph_json('rbd', 'migration', 'task', 'list')['tasks']
            assert next(t for t in tasks if t['id'] == task)['attempts'] >= 1
            assert cluster.task_end(_task(cluster, 'commit', f'rbd/{name}')).returncode == 0
            assert cluster.image_sha(f'rbd/{name}') == proxied_image['sha']
        finally:
            proxy.faults = False
            _cleanup(cluster, f'rbd/{name}')
    assert proxy.counts['503'] and proxy.counts['reset'] and proxy.counts['truncated']


def test_s3_credentials_revoked_then_restored(rgw: Cluster, slow: None, tmp_path: Path) -> None:
    """A revoked key fails the task with a one-line reason and a health
    warning; once the key is back, executing again completes the import."""
    import boto3
    from botocore.config import Config
    assert rgw.state
    env = rgw.state.env()
    admin = ['radosgw-admin', '--conf', rgw.state.conf]
    uid = f'fault-{uuid.uuid4().hex[:6]}'
    access, secret = f'AK{uuid.uuid4().hex[:16].upper()}', uuid.uuid4().hex
    subprocess.run([*admin, 'user', 'create', f'--uid={uid}', '--display-name=faults',
                    f'--access-key={access}', f'--secret={secret}'], check=True,
                   capture_output=True)
    s3 = boto3.client('s3', endpoint_url=env['RBD_MIGRATION_S3_URL'],
                      aws_access_key_id=access, aws_secret_access_key=secret,
                      region_name='us-east-1',
                      config=Config(s3={'addressing_style': 'path'}, signature_version='s3v4'))
    bucket = f'faults-{uuid.uuid4().hex[:6]}'
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(64 << 20)
    s3.put_object(Bucket=bucket, Key='disk.raw', Body=data)
    name = f'fault-s3-{uuid.uuid4().hex[:4]}'
    spec = {'type': 'raw', 'stream': {'type': 's3',
                                      'url': f"{env['RBD_MIGRATION_S3_URL']}/{bucket}/disk.raw",
                                      'access_key': access, 'secret_key': secret},
            'rbd_migration': {'engine': 'adapter'}}
    try:
        rgw.ceph('rbd', 'migration', 'prepare', '--import-only', f'rbd/{name}',
                 '--source-spec', json.dumps(spec))
        # Revoked between prepare and execute: a 64 MiB import ends in well
        # under a second, before a revocation during it could land.
        subprocess.run([*admin, 'key', 'rm', f'--uid={uid}', f'--access-key={access}'],
                       check=True, capture_output=True)
        r = rgw.task_end(_task(rgw, 'execute', f'rbd/{name}'))
        assert r.returncode != 0
        line = r.stderr.strip()
        assert '\n' not in line and 'credentials' in line and secret not in line
        checks = rgw.health_mentioning(f'rbd/{name}')
        detail = str(checks.get('RBD_MIGRATION_FAILED'))
        assert f'rbd/{name}' in detail and secret not in detail, checks
        subprocess.run([*admin, 'key', 'create', f'--uid={uid}', '--key-type=s3',
                        f'--access-key={access}', f'--secret={secret}'], check=True,
                       capture_output=True)
        retry = _task(rgw, 'execute', f'rbd/{name}')
        assert rgw.task_end(retry).returncode == 0
        assert rgw.task_end(_task(rgw, 'commit', f'rbd/{name}')).returncode == 0
        assert rgw.image_sha(f'rbd/{name}') == hashlib.sha256(data).hexdigest()
    finally:
        _cleanup(rgw, f'rbd/{name}')
        subprocess.run([*admin, 'user', 'rm', f'--uid={uid}', '--purge-data'],
                       capture_output=True)

"""Secrets never leave the source-spec: imports with a literal S3 secret key
and an HTTP URL with ``user:password@`` (the adapter engine), taken through
prepare, execute (while it runs and after), status, task list, progress, a
failed task's health warning, abort -- and then the mgr's log at its default
level, the cluster log and the crash reports are searched for every secret.

Secrets are given with ``-i FILE``: Ceph's own audit log records a command's
arguments (docs/reference/source-spec.rst: "Ceph's own audit log ..."), which the module cannot mask;
``test_inline_secret_reaches_only_cephs_audit_log`` pins that down.
"""
import errno
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import boto3
import pytest
from botocore.config import Config

from qa.cluster import Cluster

MiB = 1 << 20
ACTIVE = ('queued', 'running', 'waiting to retry')


def _ceph(cluster: Cluster, *args: str, inbuf: Optional[str] = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    assert cluster.state
    return cluster.run_ceph(*args, inbuf=inbuf, timeout=timeout)


class Transcript:
    """Everything the operator (or a log reader) could see, by label."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.texts: List[Tuple[str, str]] = []

    def add(self, label: str, text: str) -> None:
        self.texts.append((label, text))

    def run(self, label: str, *args: str, inbuf: Optional[str] = None,
            ok: Tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        r = _ceph(self.cluster, *args, inbuf=inbuf)
        self.add(label, f'rc={r.returncode}\n{r.stdout}\n{r.stderr}')
        assert r.returncode in ok, (label, r.returncode, r.stderr)
        return r

    def look(self, tag: str) -> None:
        """One round of everything that shows migrations and tasks."""
        for args in (['rbd', 'migration', 'status'],
                     ['rbd', 'migration', 'status', '-f', 'json'],
                     ['rbd', 'migration', 'task', 'list'],
                     ['rbd', 'migration', 'task', 'list', '-f', 'json-pretty'],
                     ['progress'], ['progress', 'json'], ['-s'], ['-s', '-f', 'json'],
                     ['health', 'detail'], ['health', 'detail', '-f', 'json']):
            self.run(f'{tag}: ceph {" ".join(args)}', *args)

    def leaks(self, secrets: List[str]) -> List[str]:
        return [f'{label} holds {secret[:6]}...: '
                f'{text[max(0, text.find(secret) - 200):text.find(secret) + 40]!r}'
                for label, text in self.texts for secret in secrets if secret in text]


@pytest.fixture(scope='module')
def s3_user(rgw: Cluster) -> Iterator[Dict[str, Any]]:
    """An RGW user of our own, so that the keys are unique to this run, with
    a bucket holding the test image."""
    assert rgw.state and rgw.state.rgw_port
    tag = uuid.uuid4().hex[:10]
    uid = f'secrets-{tag}'
    access, secret = f'SECRETACCESS{tag.upper()}', f'SECRETKEY-{uuid.uuid4().hex}'
    admin = ['radosgw-admin', '--conf', rgw.state.conf]
    subprocess.run([*admin, 'user', 'create', f'--uid={uid}', '--display-name=secrets test',
                    f'--access-key={access}', f'--secret={secret}'], check=True,
                   capture_output=True)
    endpoint = f'http://127.0.0.1:{rgw.state.rgw_port}'
    client = boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',
                          aws_access_key_id=access, aws_secret_access_key=secret,
                          config=Config(s3={'addressing_style': 'path'},
                                        signature_version='s3v4'))
    bucket = f'secrets-{tag}'
    client.create_bucket(Bucket=bucket)
    try:
        yield {'client': client, 'bucket': bucket, 'endpoint': endpoint,
               'access': access, 'secret': secret}
    finally:
        listed = client.list_objects_v2(Bucket=bucket).get('Contents', [])
        for obj in listed:
            client.delete_object(Bucket=bucket, Key=obj['Key'])
        client.delete_bucket(Bucket=bucket)
        subprocess.run([*admin, 'user', 'rm', f'--uid={uid}', '--purge-data'],
                       capture_output=True)


def _image(path: Path, size: int) -> Path:
    with open(path, 'wb') as f:
        f.truncate(size)
        for mib in range(0, size // MiB, 2):
            f.seek(mib * MiB)
            f.write(os.urandom(MiB))
    return path


class Scenario:
    def __init__(self, cluster: Cluster, transcript: Transcript, tmp: Path) -> None:
        self.cluster, self.t, self.tmp = cluster, transcript, tmp
        self.images: List[str] = []

    def prepare(self, name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
        """prepare --import-only with the spec in a file (-i), as the README
        advises for inline secrets."""
        path = self.tmp / f'{name}.json'
        path.write_text(json.dumps(spec))
        image = f'rbd/{name}'
        r = self.t.run(f'prepare {name}', 'rbd', 'migration', 'prepare', '--import-only',
                       image, '-i', str(path), '-f', 'json')
        self.images.append(image)
        self.t.run(f'prepare {name} (plain)', 'rbd', 'migration', 'status', image)
        return dict(json.loads(r.stdout))

    def execute(self, name: str) -> str:
        r = self.t.run(f'execute {name}', 'rbd', 'migration', 'execute', f'rbd/{name}',
                       '-f', 'json')
        return str(json.loads(r.stdout)['task']['id'])

    def abort_all(self) -> None:
        for image in self.images:
            r = self.t.run(f'abort {image}', 'rbd', 'migration', 'abort', image, '-f', 'json',
                           ok=(0, errno.ENOENT))
            if r.returncode == 0:
                task = json.loads(r.stdout)['task']['id']
                self.t.add(f'abort {image} task', self.cluster.task_end(task).stderr)


@pytest.fixture(scope='module')
def transcript(cluster: Cluster, rgw: Cluster, s3_user: Dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Transcript,
                                                                           List[str]]]:
    assert cluster.state and cluster.state.http_root and cluster.state.http_port
    tmp = tmp_path_factory.mktemp('secrets')
    tag = uuid.uuid4().hex[:8]
    password = f'HTTPPASSWORD-{uuid.uuid4().hex}'
    secrets = [s3_user['secret'], s3_user['access'], password]
    t = Transcript(cluster)
    sc = Scenario(cluster, t, tmp)
    crashes_before = {c['crash_id'] for c in cluster.ceph_json('crash', 'ls')}

    small = _image(tmp / 'small.raw', 8 * MiB)
    big = _image(tmp / 'big.raw', 24 * MiB)
    client, bucket = s3_user['client'], s3_user['bucket']
    for key, path in (('librbd.raw', small), ('gone-librbd.raw', small),
                      ('gone-adapter.raw', small)):
        client.upload_file(str(path), bucket, key)
    www = Path(cluster.state.http_root) / f'secrets-{tag}'
    www.mkdir()
    shutil.copy(big, www / 'big.raw')

    def s3(key: str, **extra: Any) -> Dict[str, Any]:
        return {'type': 'raw', 'stream': {
            'type': 's3', 'url': f"{s3_user['endpoint']}/{bucket}/{key}",
            'access_key': s3_user['access'], 'secret_key': s3_user['secret']}, **extra}

    http_url = (f'http://user:{password}@127.0.0.1:{cluster.state.http_port}/'
                f'{www.name}/big.raw')
    names = {k: f'secrets-{k}-{tag}' for k in ('s3', 'http', 'gone-librbd', 'gone-adapter')}
    adapter = {'rbd_migration': {'engine': 'adapter'}}
    try:
        # prepare: S3 through librbd, URL credentials through the adapter engine
        # Inline S3 keys would be stored in the image header by librbd: the
        # adapter engine keeps them in the module's store instead.
        prepared = sc.prepare(names['s3'], s3('librbd.raw'))
        assert prepared['path'] == 'adapter', prepared
        assert any('inline access_key and secret_key' in r
                   for r in prepared['probe']['reasons']), prepared
        prepared = sc.prepare(names['http'], {'type': 'raw', 'stream': {
            'type': 'http', 'url': http_url}})
        assert prepared['path'] == 'adapter', prepared
        sc.prepare(names['gone-librbd'], s3('gone-librbd.raw'))
        sc.prepare(names['gone-adapter'], s3('gone-adapter.raw', **adapter))
        t.look('prepared')

        # execute, watched while it runs (the adapter engine, slowed down)
        cluster.ceph('config', 'set', 'mgr', 'mgr/rbd_migration/adapter_bandwidth_mbps', '2')
        try:
            task = sc.execute(names['http'])
            seen_running = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                r = _ceph(cluster, 'rbd', 'migration', 'task', 'get', task)
                t.add('running: task get', r.stdout + r.stderr)
                if r.returncode != errno.EAGAIN:
                    break
                progress = t.run('running: ceph progress json', 'progress', 'json')
                events = json.loads(progress.stdout or '{}').get('events', [])
                seen_running += any(names['http'] in e.get('message', '') for e in events)
                t.look('running')
            assert r.returncode == 0, r.stderr
        finally:
            cluster.reset_module_option('adapter_bandwidth_mbps')
        assert seen_running, 'the running import never showed in ceph progress json'
        assert cluster.task_end(sc.execute(names['s3'])).returncode == 0
        t.look('executed')

        # the S3 objects go away: the librbd path cannot even open the target,
        # the adapter path's task fails for good (health warning)
        client.delete_object(Bucket=bucket, Key='gone-librbd.raw')
        client.delete_object(Bucket=bucket, Key='gone-adapter.raw')
        r = t.run('execute after the object went (librbd)', 'rbd', 'migration', 'execute',
                  f"rbd/{names['gone-librbd']}", '-f', 'json',
                  ok=(0, errno.ENOENT, errno.EIO))
        assert r.stderr.strip().count('\n') == 0, r.stderr
        if r.returncode == 0:   # queued after all: let it end
            gone = cluster.task_end(json.loads(r.stdout)['task']['id'])
            t.add('librbd gone task', gone.stdout + gone.stderr)
        failed = cluster.task_end(sc.execute(names['gone-adapter']))
        t.add('failed task get', failed.stdout + failed.stderr)
        assert failed.returncode == errno.ENOENT, (failed.returncode, failed.stderr)
        checks = cluster.health_mentioning(names['gone-adapter'])
        assert 'RBD_MIGRATION_FAILED' in checks, checks
        t.add('health checks (failed)', json.dumps(checks))
        t.look('failed')
    finally:
        sc.abort_all()
        (www / 'big.raw').unlink()
        www.rmdir()
    cluster.health_mentioning(names['gone-adapter'], present=False)
    t.look('aborted')

    # what is left to read: logs at the default level and crash reports
    assert cluster.state
    for log in ('mgr.x.log', 'cluster.log', 'mon.a.log'):
        path = Path(cluster.state.dir, 'out', log)
        if path.exists():
            t.add(f'log {log}', path.read_text(errors='replace'))
    t.run('crash ls', 'crash', 'ls')
    crashes = cluster.ceph_json('crash', 'ls')
    for crash in crashes:
        t.run(f"crash info {crash['crash_id']}", 'crash', 'info', crash['crash_id'])
    new = [c['crash_id'] for c in crashes if c['crash_id'] not in crashes_before]
    assert not new, f'crashes during the scenario: {new}'
    yield t, secrets


def test_no_secret_in_any_output_log_or_crash_report(
        transcript: Tuple[Transcript, List[str]]) -> None:
    t, secrets = transcript
    labels = {label.split(':')[0] for label, _ in t.texts}
    assert {'prepared', 'running', 'executed', 'failed', 'aborted', 'log mgr.x.log',
            'crash ls'} <= labels, labels
    leaks = t.leaks(secrets)
    assert not leaks, '\n'.join(leaks)


def test_masked_forms_are_what_is_shown(transcript: Tuple[Transcript, List[str]]) -> None:
    """Not vacuous: the outputs do show the sources, masked."""
    t, _ = transcript
    everything = '\n'.join(text for _, text in t.texts)
    assert 'http://user:***@127.0.0.1' in everything
    assert '"secret_key": "***"' in everything and '"access_key": "***"' in everything


def test_failed_task_names_the_source_without_secrets(
        transcript: Tuple[Transcript, List[str]]) -> None:
    t, secrets = transcript
    failed = [text for label, text in t.texts if label == 'failed task get']
    assert failed and 'failed' in failed[0] and 'gone-adapter.raw' in failed[0], failed
    health = [text for label, text in t.texts if label == 'health checks (failed)']
    assert health and 'gone-adapter' in health[0], health


def test_inline_secret_reaches_only_cephs_audit_log(cluster: Cluster,
                                                    tmp_path: Path) -> None:
    """A secret given inline (--source-spec) is in the command, which
    ceph-mgr's audit channel logs before the module sees it; the module's own
    answer and log lines must still not repeat it."""
    assert cluster.state
    secret = f'INLINESECRET-{uuid.uuid4().hex}'
    spec = {'type': 'raw', 'stream': {'type': 's3', 'url': 'http://127.0.0.1:9/bucket/key',
                                      'access_key': 'someaccesskey', 'secret_key': secret}}
    r = _ceph(cluster, 'rbd', 'migration', 'prepare', '--import-only',
              f'rbd/inline-{uuid.uuid4().hex[:6]}', '--source-spec', json.dumps(spec),
              timeout=120)
    assert r.returncode != 0 and secret not in r.stderr + r.stdout, r.stderr
    deadline = time.monotonic() + 10
    while True:  # the log is written asynchronously
        log = Path(cluster.state.dir, 'out', 'mgr.x.log').read_text(errors='replace')
        lines = [line for line in log.splitlines() if secret in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert lines, 'the audit channel no longer logs the command: update docs/reference/source-spec.rst'
    assert all('log_channel(audit)' in line for line in lines), \
        [line[:300] for line in lines if 'log_channel(audit)' not in line]

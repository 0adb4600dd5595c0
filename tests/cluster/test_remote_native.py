"""A native source in another cluster: two real clusters on this machine,
the image imported whole with its snapshots, the key never shown, and a
cluster that does not answer refused within the connect bound."""
import hashlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from qa.cluster import Cluster
from tests.clusterops import mig, mig_refused, wait_task

MiB = 1 << 20


@pytest.fixture(scope='module')
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Cluster, str, str]]:
    """A second cluster (no module use): itself, its monitor
    address and its client.admin key."""
    c = Cluster(str(tmp_path_factory.mktemp('other')))
    try:
        c.start(osds=3, osd_size=1 << 30)
        assert c.state
        conf = Path(c.state.conf).read_text()
        mon_host = re.search(r'^mon host = (.+)$', conf, re.M).group(1)  # type: ignore[union-attr]
        keyring = Path(c.state.conf).with_name('keyring').read_text()
        key = re.search(r'\[client\.admin\]\s+key = (\S+)', keyring).group(1)  # type: ignore[union-attr]
        yield c, mon_host, key
    finally:
        c.stop()


def _spec(mon_host: str, key: str, image: str, snap: str) -> Dict[str, Any]:
    return {'type': 'native', 'pool_name': 'rbd', 'image_name': image,
            'snap_name': snap, 'mon_host': mon_host, 'key': key}


def test_import_from_another_cluster_with_snapshots(
        cluster: Cluster, other: Tuple[Cluster, str, str]) -> None:
    remote, mon_host, key = other
    image = f'far-{uuid.uuid4().hex[:6]}'
    remote.rbd('create', '--size', '32M', f'rbd/{image}')
    remote.rbd('bench', '--io-type', 'write', '--io-total', '4M', '--io-pattern', 'rand',
               f'rbd/{image}')
    remote.rbd('snap', 'create', f'rbd/{image}@one')
    remote.rbd('bench', '--io-type', 'write', '--io-total', '2M', '--io-pattern', 'rand',
               f'rbd/{image}')
    remote.rbd('snap', 'create', f'rbd/{image}@two')
    remote.rbd('bench', '--io-type', 'write', '--io-total', '1M', f'rbd/{image}')  # after: not imported
    target = f'rbd/{image}'
    prepared = mig(cluster, 'prepare', '--import-only', target,
                   '--source-spec', json.dumps(_spec(mon_host, key, image, 'two')))
    assert prepared['path'] == 'adapter'
    assert any('another cluster' in r for r in prepared['probe']['reasons'])
    shown = json.dumps(prepared) + json.dumps(mig(cluster, 'status', target))
    assert key not in shown and '***' in shown
    wait_task(cluster, str(mig(cluster, 'execute', target)['task']['id']))
    wait_task(cluster, str(mig(cluster, 'verify', target)['task']['id']))  # reconnects
    wait_task(cluster, str(mig(cluster, 'commit', target)['task']['id']))
    assert [s['name'] for s in json.loads(cluster.rbd('snap', 'ls', '--format', 'json',
                                                      target))] == ['one']
    assert cluster.image_sha(target) == remote.image_sha(f'rbd/{image}@two')
    assert cluster.image_sha(f'{target}@one') == remote.image_sha(f'rbd/{image}@one')


def test_a_wrong_key_and_a_silent_cluster_are_refused_in_one_line(
        cluster: Cluster, other: Tuple[Cluster, str, str]) -> None:
    remote, mon_host, key = other
    wrong = key[:-6] + ('AAAAA=' if not key.endswith('AAAAA=') else 'BBBBB=')
    _, err = mig_refused(cluster, 'prepare', '--import-only', 'rbd/far-wrong',
                         '--source-spec', json.dumps(_spec(mon_host, wrong, 'x', 's')))
    assert 'refused client.admin' in err and wrong not in err
    started = time.monotonic()
    _, err = mig_refused(cluster, 'prepare', '--import-only', 'rbd/far-silent',
                         '--source-spec', json.dumps(_spec('127.0.0.1:9', key, 'x', 's')))
    assert 'cannot connect to cluster' in err and key not in err
    assert time.monotonic() - started < 60
    assert 'far-wrong' not in cluster.rbd('ls', 'rbd').split()


def test_cluster_name_finds_its_conf_and_keyring(
        other: Tuple[Cluster, str, str], tmp_path: Path) -> None:
    """The other form: ``<cluster>.conf`` and ``<cluster>.<client>.keyring``
    in the conf directory, nothing else read."""
    from rbd_migration.context import SourceContext
    from rbd_migration.errors import NotFound
    from rbd_migration.formats import open_format
    remote, _, _ = other
    assert remote.state
    image = f'far-{uuid.uuid4().hex[:6]}'
    remote.rbd('create', '--size', '8M', f'rbd/{image}')
    remote.rbd('bench', '--io-type', 'write', '--io-total', '2M', f'rbd/{image}')
    remote.rbd('snap', 'create', f'rbd/{image}@now')
    spec = {'type': 'native', 'pool_name': 'rbd', 'image_name': image, 'snap_name': 'now',
            'cluster_name': 'old'}
    ctx = SourceContext(remote_conf_dir=str(tmp_path))
    with pytest.raises(NotFound) as caught:
        open_format(spec, ctx)
    assert 'old.conf' in str(caught.value) and '\n' not in str(caught.value)
    (tmp_path / 'old.conf').write_text(Path(remote.state.conf).read_text())
    keyring = Path(remote.state.conf).with_name('keyring')
    (tmp_path / 'old.client.admin.keyring').write_text(keyring.read_text())
    with open_format(spec, ctx) as fmt:
        assert fmt.size() == 8 * MiB
        data = fmt.read(0, 8 * MiB)
    assert hashlib.sha256(data).hexdigest() == remote.image_sha(f'rbd/{image}@now')

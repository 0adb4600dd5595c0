"""``remote_cluster_conf_dir``: where a native source's ``cluster_name``
finds the other cluster's conf and keyring.  The option reaches the
context every source is opened with, a ``cluster_name`` source looks there
and nowhere else, and a relative value is refused in one line."""
from pathlib import Path
from typing import Any, Dict, cast

import pytest
import rados

from rbd_migration.errors import InvalidArgument, NotFound
from rbd_migration.formats import open_format
from rbd_migration.service import MigrationService
from rbd_migration.settings import Settings
from rbd_migration.source_spec import validate_source_spec

from tests.queueharness import MemStore, Recorder

SPEC = {'type': 'native', 'cluster_name': 'far', 'pool_name': 'rbd', 'image_name': 'vm',
        'snap_name': 'base'}


def _service(**options: Any) -> MigrationService:
    """A service whose client is never called: building a source context
    only hands it on (native sources of this cluster use it)."""
    values: Dict[str, Any] = dict(options)
    return MigrationService(cast(rados.Rados, object()), MemStore(), Recorder(), values.get)


def test_the_default_is_upstreams_place() -> None:
    assert _service().source_context().remote_conf_dir == '/etc/ceph'


def test_the_option_reaches_the_context_and_a_cluster_name_source_looks_there(
        tmp_path: Path) -> None:
    ctx = _service(remote_cluster_conf_dir=str(tmp_path)).source_context()
    assert ctx.remote_conf_dir == str(tmp_path)
    spec = validate_source_spec(SPEC)
    with pytest.raises(NotFound) as e:
        open_format(spec, ctx)
    assert f"no conf '{tmp_path}/far.conf'" in str(e.value)
    assert f'in {tmp_path} on the mgr hosts' in str(e.value)
    (tmp_path / 'far.conf').write_text('[global]\n')
    with pytest.raises(NotFound, match=f"no keyring '{tmp_path}/far.client.admin.keyring'"):
        open_format(spec, ctx)


@pytest.mark.parametrize('value', ['etc/ceph', '', './conf'])
def test_a_relative_directory_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        _service(remote_cluster_conf_dir=value).source_context()
    text = str(e.value)
    assert text.startswith(f'remote_cluster_conf_dir: {value!r} is not an absolute path')
    assert 'ceph config set mgr mgr/rbd_migration/remote_cluster_conf_dir' in text
    assert '\n' not in text


def test_settings_read_it_as_given() -> None:
    assert Settings.read({'remote_cluster_conf_dir': '/srv/ceph-peers'}.get).remote_conf_dir \
        == '/srv/ceph-peers'

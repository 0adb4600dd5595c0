"""Decoders of what librbd keeps in RADOS objects, on bytes as Pacific
writes them."""
import struct

import pytest

from rbd_migration.engine.ondisk import (HEADER_SOURCE, HEADER_TARGET,
                                        decode_migration_header, decode_trash_spec)


def _string(text: str) -> bytes:
    return struct.pack('<I', len(text)) + text.encode()


def _migration_spec(header_type: int, pool_id: int, namespace: str, name: str,
                    image_id: str, snap_seqs: dict, state: int,
                    description: str = '', source_spec: str = '') -> bytes:
    body = (struct.pack('<Bq', header_type, pool_id) + _string(namespace)
            + _string(name) + _string(image_id)
            + struct.pack('<I', len(snap_seqs))
            + b''.join(struct.pack('<QQ', k, v) for k, v in snap_seqs.items())
            + struct.pack('<QBB', 64 << 20, 0, 0) + struct.pack('<B', state)
            + _string(description) + b'\0' + _string(source_spec))
    return struct.pack('<BBI', 3, 1, len(body)) + body


def test_source_header_written_by_pacific() -> None:
    # The ``migration`` key of a source's header after prepare and execute.
    value = bytes.fromhex(
        '03014200000001020000000000000000000000090000006331382d3239373033'
        '0c0000003132373634646235356661340000000000000000000000000000'
        '0400000000000000000000')
    h = decode_migration_header(value)
    assert (h.header_type, h.pool_id, h.namespace, h.image_name, h.image_id,
            h.state) == (HEADER_SOURCE, 2, '', 'c18-29703', '12764db55fa4', 'executed')
    assert (h.state_description, h.source_spec) == ('', '')


@pytest.mark.parametrize('state,text', [(0, 'error'), (2, 'prepared'), (5, 'aborting'),
                                        (9, 'unknown')])
def test_target_header_with_snapshots(state: int, text: str) -> None:
    value = _migration_spec(HEADER_TARGET, 7, 'ns1', 'vm-disk', 'abc123',
                            {4: 1, 9: 2}, state, 'why', '{"type": "raw"}')
    h = decode_migration_header(value)
    assert (h.header_type, h.pool_id, h.namespace, h.image_name, h.image_id,
            h.state) == (HEADER_TARGET, 7, 'ns1', 'vm-disk', 'abc123', text)
    assert (h.state_description, h.source_spec) == ('why', '{"type": "raw"}')


def test_truncated_header_is_refused() -> None:
    value = _migration_spec(HEADER_SOURCE, 1, '', 'name', 'id', {}, 4)
    with pytest.raises((ValueError, struct.error)):
        decode_migration_header(value[:20])


def test_trash_spec() -> None:
    body = struct.pack('<B', 2) + _string('vm-disk') + b'\0' * 16
    assert decode_trash_spec(struct.pack('<BBI', 2, 1, len(body)) + body) == (2, 'vm-disk')

"""The adapter engine's copy checkpoint in the target's metadata: written
as a versioned JSON object, read back as written; the ``layer:offset`` text
today's module writes still resumes where it says; anything garbled, and a
newer module's checkpoint, copies from the start (always safe)."""
import json
import logging

import pytest

from rbd_migration.engine.adapter import (CHECKPOINT_VERSION, decode_checkpoint,
                                          encode_checkpoint)
from rbd_migration.engine.copier import Checkpoint


def test_a_checkpoint_is_written_versioned_and_read_back() -> None:
    text = encode_checkpoint(Checkpoint(3, 4096))
    assert json.loads(text) == {'layer': 3, 'offset': 4096, 'version': CHECKPOINT_VERSION}
    assert decode_checkpoint(text) == Checkpoint(3, 4096)
    assert decode_checkpoint(encode_checkpoint(Checkpoint())) == Checkpoint()


def test_todays_layer_offset_text_resumes_where_it_says() -> None:
    assert decode_checkpoint('3:4096') == Checkpoint(3, 4096)
    assert decode_checkpoint('0:0') == Checkpoint()


@pytest.mark.parametrize('text', [
    None, '', 'garbage', '3:', '1:2:3', '{not json', '[3, 4096]', '12',
    '{"layer": "3", "offset": 4096, "version": 2}',
    '{"layer": 3, "offset": 4096.5, "version": 2}',
    '{"layer": true, "offset": 4096, "version": 2}',
    '{"layer": 3, "offset": -1, "version": 2}',
    '{"layer": 3, "offset": 4096, "version": "2"}',
    '{"layer": 3, "offset": 4096, "version": 0}',
])
def test_no_or_a_garbled_checkpoint_copies_from_the_start(text: str) -> None:
    assert decode_checkpoint(text) == Checkpoint()


def test_a_newer_modules_checkpoint_is_not_trusted(caplog: pytest.LogCaptureFixture) -> None:
    newer = json.dumps({'layer': 3, 'offset': 4096, 'version': CHECKPOINT_VERSION + 1})
    with caplog.at_level(logging.WARNING):
        assert decode_checkpoint(newer) == Checkpoint()
    assert 'copying from the start: copy checkpoint record version 3 is newer' in caplog.text

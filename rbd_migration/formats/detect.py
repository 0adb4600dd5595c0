"""Tell an image format from its first bytes.

The probe reads the start of a source declared ``raw`` and asks this module
whether it is really something else, so that a qcow2 file is not copied
byte for byte (metadata and all) into an RBD image.
"""
from typing import Optional

#: qcow (v1) and qcow2 share this magic; the version field tells them apart.
QCOW_MAGIC = b'QFI\xfb'

#: How many leading bytes ``sniff`` needs.
SNIFF_LENGTH = len(QCOW_MAGIC)


def sniff(first_bytes: bytes) -> Optional[str]:
    """The source-spec ``type`` whose magic ``first_bytes`` starts with."""
    if first_bytes.startswith(QCOW_MAGIC):
        return 'qcow'
    return None

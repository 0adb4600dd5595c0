"""Tell an image format from its first bytes.

The probe reads the start of a source and asks this module what it really
is, so that a qcow2 file or an rbd export declared ``raw`` is not copied
byte for byte (metadata and all) into an RBD image.
"""
from typing import Optional

#: qcow (v1) and qcow2 share this magic; the version field tells them apart.
QCOW_MAGIC = b'QFI\xfb'
#: The banners ``rbd export --export-format 2`` and ``rbd export-diff`` write.
IMAGE_BANNER_V2 = b'rbd image v2\n'
IMAGE_DIFFS_BANNER_V2 = b'rbd image diffs v2\n'
DIFF_BANNER_V1 = b'rbd diff v1\n'
DIFF_BANNER_V2 = b'rbd diff v2\n'

#: How many leading bytes ``sniff`` needs.
SNIFF_LENGTH = len(IMAGE_DIFFS_BANNER_V2)


def sniff(first_bytes: bytes) -> Optional[str]:
    """The source-spec ``type`` whose magic ``first_bytes`` starts with."""
    if first_bytes.startswith(QCOW_MAGIC):
        return 'qcow'
    if first_bytes.startswith(IMAGE_BANNER_V2):
        return 'export'
    if first_bytes.startswith((DIFF_BANNER_V1, DIFF_BANNER_V2)):
        return 'export-diff'
    return None

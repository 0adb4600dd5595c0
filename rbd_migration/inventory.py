"""What a batch plan needs to know about the images of a pool: sizes,
snapshots, parents and clones, and who has them open.

Read-only: opening an image read-only takes no lock and changes nothing,
so a dry run is exactly as harmless as it claims.
"""
from typing import List, Optional, Set

import rados
import rbd

from .batch import ImageFacts

#: librbd's RBD_OPERATION_FEATURE_MIGRATION, which python3-rbd does not export.
OP_FEATURE_MIGRATION = 1 << 4


def image_names(io: rados.Ioctx) -> List[str]:
    return sorted(e['name'] for e in rbd.RBD().list2(io))


def _ref(pool: str, namespace: str, name: str) -> str:
    return f"{pool}/{namespace + '/' if namespace else ''}{name}"


def describe(io: rados.Ioctx, name: str, dest_names: Set[str], dest: str) -> ImageFacts:
    """One image's facts; ``dest_names`` are the names taken in the target
    pool (and namespace) ``dest``."""
    try:
        with rbd.Image(io, name, read_only=True) as img:
            size = int(img.size())
            snaps = sum(1 for _ in img.list_snaps())
            parent: Optional[str] = None
            try:
                p = img.get_parent_image_spec()
                parent = f"{_ref(p['pool_name'], p['pool_namespace'], p['image_name'])}" \
                         f"@{p['snap_name']}"
            except rbd.ImageNotFound:
                parent = None
            clones = [_ref(c['pool'], c['pool_namespace'], c['image'])
                      for c in img.list_children2()]
            watchers = [f"client.{w['id']} at {w['addr']}" for w in img.watchers_list()]
            migrating = bool(img.op_features() & OP_FEATURE_MIGRATION)
    except rbd.ImageNotFound:
        return ImageFacts(name, 0, 0, blocked='removed since it was listed')
    facts = ImageFacts(name, size, snaps, parent, clones, watchers)
    if migrating:
        facts.blocked = ('already the target of a migration; commit or abort that '
                         'migration first')
    elif name in dest_names:
        facts.blocked = f"an image named '{name}' already exists in {dest}"
    return facts

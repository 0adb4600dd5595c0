"""rbd_migration: RBD image live-migration as a ceph-mgr service.

Inside ceph-mgr the package exports ``Module`` and ``StandbyModule``; everywhere else (tests,
scripts) its sub-modules import without a mgr.
"""
import importlib.util

if importlib.util.find_spec('ceph_module') is not None:  # inside ceph-mgr
    from .module import Module, StandbyModule  # noqa: F401

"""The mgr's own ``mgr_module`` on a stand-in for the C side of ceph-mgr.

``module.py`` subclasses ``mgr_module.MgrModule``, which subclasses
``ceph_module.BaseMgrModule``, a type only the ceph-mgr binary provides.
Ceph's own mgr unit tests replace that type; so does this, with a small
in-memory KV store and options, so that the real ``mgr_module`` (from the
ceph-mgr package) and the real ``module.py`` load without a mgr.  It holds
no cluster: a test gives the module the services it talks to.
"""
import importlib.machinery
import sys
import types
from typing import Any, Dict, List, Optional, Tuple

MGR_PATH = '/usr/share/ceph/mgr'


class BaseMgrModule:
    """What ``MgrModule`` calls on the mgr, kept in memory."""

    def __init__(self, py_modules_ptr: object, this_ptr: object) -> None:
        self.store: Dict[str, str] = {}
        self.options: Dict[str, Any] = {}
        self.health: Dict[str, Any] = {}
        self.cluster_log: List[Tuple[str, int, str]] = []

    def _ceph_get_option(self, key: str) -> Any:
        return {'debug_mgr': '1/5', 'log_file': ''}.get(key)

    def _ceph_get_module_option(self, module: str, key: str, prefix: str = '') -> Any:
        return self.options.get(key)

    def _ceph_set_module_option(self, module: str, key: str, val: Optional[str]) -> None:
        self.options[key] = val

    def _ceph_get_version(self) -> str:
        return '16.2.15'

    def _ceph_get_release_name(self) -> str:
        return 'pacific'

    def _ceph_get_mgr_id(self) -> str:
        return 'x'

    def _ceph_get_store(self, key: str) -> Optional[str]:
        return self.store.get(key)

    def _ceph_set_store(self, key: str, val: Optional[str]) -> None:
        if val is None:
            self.store.pop(key, None)
        else:
            self.store[key] = val

    def _ceph_get_store_prefix(self, prefix: str) -> Dict[str, str]:
        return {k: v for k, v in self.store.items() if k.startswith(prefix)}

    def _ceph_set_health_checks(self, checks: Dict[str, Any]) -> None:
        self.health = checks

    def _ceph_cluster_log(self, channel: str, priority: int, message: str) -> None:
        self.cluster_log.append((channel, priority, message))

    def _ceph_log(self, *args: Any) -> None:
        pass

    def _ceph_log_level_to_python(self, level: str) -> str:
        return 'INFO'


def install() -> types.ModuleType:
    """Make ``import mgr_module`` load the real one on the stand-in, and
    return the module's ``module.py``."""
    if 'ceph_module' not in sys.modules:
        stub = types.ModuleType('ceph_module')
        stub.__spec__ = importlib.machinery.ModuleSpec('ceph_module', None)
        for name in ('BasePyOSDMap', 'BasePyOSDMapIncremental', 'BasePyCRUSH',
                     'BaseMgrStandbyModule'):
            setattr(stub, name, type(name, (), {}))
        setattr(stub, 'BaseMgrModule', BaseMgrModule)
        sys.modules['ceph_module'] = stub
    if MGR_PATH not in sys.path:
        sys.path.append(MGR_PATH)
    from rbd_migration import module
    if not getattr(module.Module, '_stub_registered', False):
        # What ceph-mgr does as it loads a module: the logging options.
        module.Module._register_options('rbd_migration')
        module.Module._register_commands('rbd_migration')
        setattr(module.Module, '_stub_registered', True)
    return module

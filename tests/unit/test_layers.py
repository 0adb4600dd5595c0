"""The engine stays acyclic and layered, and the sources stay below it.

Each ``rbd_migration/engine`` module sits in one layer and imports engine
modules only from the layers below its own: the on-disk reads and the
migration types, then the cluster helpers, then the finishing of
interrupted migrations, then status reading, then librbd's actions (and
the adapter's copier), then what drives them.  Format and stream drivers
import nothing of the engine.  Imports are read from the source (also those
under ``if TYPE_CHECKING`` or inside functions): a cycle that only the type
checker sees is still one.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / 'rbd_migration'
ENGINE = 'rbd_migration.engine'

#: The engine's modules, bottom layer first.
LAYERS: List[Set[str]] = [
    {'migration', 'ondisk', 'buffers'},
    {'cluster'},
    {'interrupted'},
    {'status'},
    {'librbd', 'copier'},
    {'adapter', 'prefill'},
    {'isolated'},
]


def imported(source: str, module: str) -> Set[str]:
    """The absolute names of the modules that ``module``'s ``source``
    imports (``from pkg import name`` counts ``pkg.name`` too, since the
    name may be a module)."""
    package = module.rsplit('.', 1)[0].split('.')
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = '.'.join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f'{target}.{alias.name}' for alias in node.names)
    return found


def engine_imports(source: str, module: str) -> Set[str]:
    """The engine modules (short names) that ``source`` imports."""
    prefix = ENGINE + '.'
    return {name[len(prefix):].split('.')[0] for name in imported(source, module)
            if name.startswith(prefix)}


def layer_of() -> Dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def upward(source: str, name: str) -> Set[str]:
    """The engine modules ``engine/<name>.py`` imports from its own layer
    or above."""
    layers = layer_of()
    return {dep for dep in engine_imports(source, f'{ENGINE}.{name}')
            if dep != name and layers.get(dep, len(LAYERS)) >= layers[name]}


def engine_modules() -> Dict[str, str]:
    return {p.stem: p.read_text() for p in (PACKAGE / 'engine').glob('*.py')
            if p.name != '__init__.py'}


def test_every_engine_module_has_a_layer() -> None:
    unplaced = sorted(set(engine_modules()) - set(layer_of()))
    assert not unplaced, f'engine modules without a layer in LAYERS: {", ".join(unplaced)}'
    gone = sorted(set(layer_of()) - set(engine_modules()))
    assert not gone, f'LAYERS names what is not in engine/: {", ".join(gone)}'


def test_engine_modules_import_only_from_below() -> None:
    wrong = {f'engine/{name}.py': sorted(deps) for name, source in engine_modules().items()
             if (deps := upward(source, name))}
    assert not wrong, f'engine modules importing from their layer or above: {wrong}'


def test_sources_import_nothing_of_the_engine() -> None:
    wrong = {}
    for package in ('formats', 'streams'):
        for path in sorted((PACKAGE / package).glob('*.py')):
            module = f'rbd_migration.{package}.{path.stem}'
            deps = engine_imports(path.read_text(), module)
            if deps or ENGINE in imported(path.read_text(), module):
                wrong[str(path.relative_to(REPO))] = sorted(deps) or [ENGINE]
    assert not wrong, f'format and stream drivers importing the engine: {wrong}'


def test_an_upward_import_is_caught() -> None:
    """The checks see every spelling of an import, guarded or not."""
    for source in ('from .librbd import LibrbdEngine',
                   'from typing import TYPE_CHECKING\n'
                   'if TYPE_CHECKING:\n    from .status import StatusReader',
                   'from . import librbd',
                   'from rbd_migration.engine.status import StatusReader',
                   'import rbd_migration.engine.librbd',
                   'def f():\n    from ..engine import interrupted'):
        assert upward(source, 'cluster'), source
    assert not upward('from . import ondisk\nfrom .migration import ImageRef', 'cluster')
    assert engine_imports('from ..engine.librbd import LibrbdEngine',
                          'rbd_migration.formats.raw') == {'librbd'}
    assert ENGINE in imported('from .. import engine', 'rbd_migration.formats.raw')

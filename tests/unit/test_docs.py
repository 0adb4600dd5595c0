"""The documentation stays true to the tree.

The generated reference pages match ``rbd_migration/module.py`` (an option
or a command changed without ``tools/gen_options_doc.py`` fails here), the
README stays a landing page, every link, ``:doc:`` role, image and path a
page names leads to something that exists (a ``#fragment`` to a section of
the page it names), and the design's code map lists the package's files as
they are."""
import importlib.util
import re
import unicodedata
from pathlib import Path
from types import ModuleType
from typing import Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
README = REPO / 'README.rst'
DOCS = REPO / 'docs'
README_MAX_LINES = 200

#: Pages whose links are checked.
PAGES = sorted([README, REPO / 'qa' / 'bench' / 'README.rst', *DOCS.rglob('*.rst')])

_INLINE_LITERAL = re.compile(r'``.+?``', re.S)
_REFERENCE = re.compile(r'(?<![`\w])`([^`]+)`(__?)(?!\w)')
_EMBEDDED = re.compile(r'^(.*?)<([^<>]+)>\s*$', re.S)
_DOC_ROLE = re.compile(r':doc:`([^`]+)`')
_DIRECTIVE_PATH = re.compile(r'^\s*\.\. (?:image|figure|include|literalinclude)::\s*(\S+)', re.M)
_EXPLICIT_TARGET = re.compile(r'^\s*\.\. _([^:]+):', re.M)
_ADORNMENT = re.compile(r'^([!-/:-@\[-`{-~])\1+\s*$')
#: A path with a pattern or a template (``formats/<name>.py``) names no file.
_TEMPLATE = re.compile(r'[<>*{}\[\]]')


def _load_generator() -> ModuleType:
    path = REPO / 'tools' / 'gen_options_doc.py'
    spec = importlib.util.spec_from_file_location('gen_options_doc', path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_reference_is_current() -> None:
    gen = _load_generator()
    stale = [str(p.relative_to(REPO)) for p in gen.stale()]
    assert not stale, f'{", ".join(stale)} differ from rbd_migration/module.py: ' \
                      'run tools/gen_options_doc.py'


def test_every_option_is_documented() -> None:
    gen = _load_generator()
    text = gen.OPTIONS_DOC.read_text()
    for opt in gen.options(gen.MODULE.read_text()):
        assert f'\n{opt.name}\n{"-" * len(opt.name)}\n' in text, opt.name


def test_readme_is_a_landing_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, \
        f'README.rst has {lines} lines (at most {README_MAX_LINES}): move detail into docs/'


# -- links -------------------------------------------------------------------

def make_id(text: str) -> str:
    """A section's id as docutils (and so GitHub) makes it."""
    text = unicodedata.normalize('NFKD', text.lower()).encode('ascii', 'ignore').decode()
    text = re.sub(r'[^a-z0-9]+', '-', ' '.join(text.split()))
    return re.sub(r'^[-0-9]+|-+$', '', text)


def _refname(text: str) -> str:
    return ' '.join(text.split()).lower()


def titles(text: str) -> List[str]:
    """The section titles of a page, inline markup dropped."""
    lines = text.splitlines()
    out = []
    for above, line in zip(lines, lines[1:]):
        title = above.strip()
        if (title and not _ADORNMENT.match(above) and _ADORNMENT.match(line)
                and len(line.rstrip()) >= len(title) and not above.startswith(' ')):
            out.append(title.replace('``', '').replace('*', ''))
    return out


def targets(text: str) -> Tuple[Set[str], Set[str]]:
    """What a reference in a page may name: reference names (titles and
    explicit targets) and ids (for a ``#fragment``)."""
    names = {_refname(t) for t in titles(text)}
    names |= {_refname(t) for t in _EXPLICIT_TARGET.findall(text)}
    return names, {make_id(n) for n in names}


def references(page: Path) -> Iterator[Tuple[str, str]]:
    """(kind, target) of each reference in a page: ``link`` for an embedded
    URI, ``name`` for a reference to a title or target of the page, ``doc``
    for a ``:doc:`` role, ``file`` for a directive's file, ``path`` for a
    path of the tree named in the text."""
    text = page.read_text()
    for m in _DOC_ROLE.finditer(text):
        embedded = _EMBEDDED.match(m.group(1))
        yield 'doc', embedded.group(2) if embedded else m.group(1)
    prose = _INLINE_LITERAL.sub('``x``', _DOC_ROLE.sub('', text))
    for m in _REFERENCE.finditer(prose):
        embedded = _EMBEDDED.match(m.group(1))
        if embedded is None:
            if m.group(2) == '_':
                yield 'name', m.group(1)
        elif embedded.group(2).endswith('_'):
            yield 'name', embedded.group(2)[:-1]
        else:
            yield 'link', ''.join(embedded.group(2).split())
    for target in _DIRECTIVE_PATH.findall(text):
        yield 'file', target
    yield from (('path', p) for p in _paths(text))


def _paths(text: str) -> Iterator[str]:
    tops = '|'.join(re.escape(d.name) for d in REPO.iterdir()
                    if d.is_dir() and d.name not in ('.git', '.tox')
                    and not d.name.endswith(('_cache', '__pycache__')))
    for m in re.finditer(rf'(?<![\w./~$-])((?:{tops})/[^\s`\'")#]*)', text):
        if not _TEMPLATE.search(m.group(1)):
            yield m.group(1).rstrip('.,;:')


def broken(page: Path) -> List[str]:
    names, _ = targets(page.read_text())
    out = []
    for kind, target in references(page):
        if kind == 'link':
            if '://' in target or target.startswith('mailto:'):
                continue
            where, _, fragment = target.partition('#')
            path = (page.parent / where) if where else page
            if not path.exists():
                out.append(f'{target}: no such file')
            elif fragment and path.suffix == '.rst' and \
                    fragment not in targets(path.read_text())[1]:
                out.append(f'{target}: no section #{fragment} in {where or page.name}')
        elif kind == 'name':
            if _refname(target) not in names:
                out.append(f'`{target}`_: no such section or target in this page')
        elif kind == 'doc':
            base = DOCS if target.startswith('/') else page.parent
            if not (base / (target.lstrip('/') + '.rst')).exists():
                out.append(f':doc:`{target}`: no such page')
        elif kind == 'file':
            if not (page.parent / target).exists():
                out.append(f'{target}: no such file')
        elif not (REPO / target).exists():
            out.append(f'{target}: no such path in the tree')
    return out


def test_links_and_paths_lead_somewhere() -> None:
    failures = [f'{page.relative_to(REPO)}: {what}' for page in PAGES for what in broken(page)]
    assert not failures, '\n'.join(failures)


def test_every_page_of_docs_is_linked() -> None:
    """No page of docs/ is an orphan: each is linked from another page."""
    linked: Set[Path] = set()
    for page in PAGES:
        for kind, target in references(page):
            if kind == 'link' and '://' not in target:
                linked.add((page.parent / target.partition('#')[0]).resolve())
    orphans = [str(p.relative_to(REPO)) for p in DOCS.rglob('*.rst')
               if p.resolve() not in linked]
    assert not orphans, f'linked from no page: {", ".join(orphans)}'


# -- the code map --------------------------------------------------------------

def code_map() -> Set[str]:
    """The paths the code map in docs/design.rst lists (``dir/`` lines open
    a folder for the lines indented below them)."""
    text = (DOCS / 'design.rst').read_text()
    block = text.split('\nCode map\n', 1)[1].split('::\n', 1)[1]
    listed: Set[str] = set()
    stack: List[Tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(' '):
            break
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else '') + name
        if name.endswith('/'):
            stack.append((indent, path))
        listed.add(path)
    return listed


def test_code_map_lists_the_tree() -> None:
    listed = code_map()
    gone = sorted(p for p in listed if not (REPO / p).exists())
    assert not gone, f'docs/design.rst lists what is not there: {", ".join(gone)}'
    files = {str(p.relative_to(REPO)) for top in ('rbd_migration', 'rbd_migration_cli')
             for p in (REPO / top).rglob('*.py')
             if p.name != '__init__.py' and '__pycache__' not in p.parts}
    missing = sorted(files - listed)
    assert not missing, f'docs/design.rst\'s code map lacks: {", ".join(missing)}'

#!/usr/bin/python3
"""Write the generated reference pages from ``rbd_migration/module.py``.

``docs/reference/options.rst`` comes from the ``MODULE_OPTIONS`` the module
declares, ``docs/reference/commands.rst`` from its ``@command`` handlers, so
neither can drift from the code.  module.py imports ``mgr_module`` and cannot
be imported outside ceph-mgr, so it is parsed with ``ast`` (as
``tests/unit/test_option_defaults.py`` does); every value read must be a
literal, or arithmetic on literals (``1 << 20``).

Usage::

   tools/gen_options_doc.py           # write the pages
   tools/gen_options_doc.py --check   # exit 1, naming them, if a page is stale
"""
import argparse
import ast
import operator
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / 'rbd_migration' / 'module.py'
OPTIONS_DOC = REPO / 'docs' / 'reference' / 'options.rst'
COMMANDS_DOC = REPO / 'docs' / 'reference' / 'commands.rst'
SCRIPT = 'tools/gen_options_doc.py'

#: ``Option`` keywords shown as fields of their own, in this order.
_SHOWN = ('type', 'default', 'min', 'max', 'enum_allowed', 'runtime', 'see_also',
          'desc', 'long_desc')
#: Caps a command's permission asks of the client.
_CAPS = {'r': "mgr 'allow r'", 'w': "mgr 'allow rw'"}
#: Parameters of a handler that are not command arguments.
_NOT_ARGS = ('self', 'inbuf')

_BINOPS: Dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
    ast.LShift: operator.lshift, ast.RShift: operator.rshift,
}


class NotLiteral(ValueError):
    """A value in module.py the docs cannot read without running it."""


def literal(node: ast.expr, where: str) -> Any:
    """The value of a literal, or of arithmetic on literals."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](literal(node.left, where), literal(node.right, where))
    raise NotLiteral(f'{where}: {ast.unparse(node)} is not a literal; '
                     f'{SCRIPT} reads module.py without running it')


@dataclass
class OptionDoc:
    name: str
    values: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Param:
    name: str
    annotation: str
    required: bool


@dataclass
class CommandDoc:
    prefix: str
    perm: str
    desc: str
    params: List[Param]
    takes_input: bool


def _module_class(tree: ast.Module) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(s, ast.Assign) and _assigns(s, 'MODULE_OPTIONS') for s in node.body):
            return node
    raise NotLiteral(f'{MODULE}: no class declares MODULE_OPTIONS')


def _assigns(stmt: ast.Assign, name: str) -> bool:
    return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)


def options(source: str) -> List[OptionDoc]:
    """``MODULE_OPTIONS``, in the order declared."""
    cls = _module_class(ast.parse(source))
    stmt = next(s for s in cls.body if isinstance(s, ast.Assign) and _assigns(s, 'MODULE_OPTIONS'))
    if not isinstance(stmt.value, (ast.List, ast.Tuple)):
        raise NotLiteral('MODULE_OPTIONS is not a list of Option(...)')
    out = []
    for call in stmt.value.elts:
        if not (isinstance(call, ast.Call) and getattr(call.func, 'id', '') == 'Option'):
            raise NotLiteral(f'MODULE_OPTIONS: {ast.unparse(call)} is not Option(...)')
        name = literal(call.args[0], 'Option') if call.args else None
        values = {k.arg: literal(k.value, f'option {name}') for k in call.keywords
                  if k.arg is not None}
        if name is None:
            name = values.pop('name')
        out.append(OptionDoc(str(name), values))
    return out


def commands(source: str) -> List[CommandDoc]:
    """The ``@command(prefix, perm, ...)`` handlers of the module class, in
    the order declared."""
    out = []
    for node in _module_class(ast.parse(source)).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, 'id', '') == 'command':
                prefix = literal(deco.args[0], node.name)
                perm = literal(deco.args[1], node.name)
                out.append(CommandDoc(prefix, perm, _docstring(node), _params(node),
                                      any(a.arg == 'inbuf' for a in node.args.args)))
    return out


def _docstring(func: ast.FunctionDef) -> str:
    return ' '.join((ast.get_docstring(func) or '').split())


def _params(func: ast.FunctionDef) -> List[Param]:
    args = func.args.args
    first_default = len(args) - len(func.args.defaults)
    return [Param(a.arg, ast.unparse(a.annotation) if a.annotation else 'str', i < first_default)
            for i, a in enumerate(args) if a.arg not in _NOT_ARGS]


# -- rendering -----------------------------------------------------------------

def _heading(text: str, mark: str, over: bool = False) -> List[str]:
    rule = mark * len(text)
    return [rule, text, rule] if over else [text, rule]


def _paragraph(text: str) -> List[str]:
    """A declared description as a sentence: capitalised, ending with a
    full stop, wrapped."""
    text = ' '.join(text.split())
    if not text:
        return []
    text = text[0].upper() + text[1:]
    return _wrap(text if text.endswith(('.', '!', '?')) else text + '.', 76, '') + ['']


def _size(value: int) -> str:
    for unit, shift in (('TiB', 40), ('GiB', 30), ('MiB', 20), ('KiB', 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f'{value >> shift} {unit}'
    return f'{value} B'


def show(value: Any, option: str = '') -> str:
    """A value as ``ceph config set`` takes it."""
    if isinstance(value, bool):
        return '``true``' if value else '``false``'
    if isinstance(value, str):
        return f'``{value}``' if value else 'empty'
    if isinstance(value, float):
        return f'``{int(value)}``' if value.is_integer() else f'``{value!r}``'
    if isinstance(value, int):
        if option.endswith('_bytes') and value >= 1024:
            return f'``{value}`` ({_size(value)})'
        return f'``{value}``'
    if isinstance(value, (list, tuple)):
        return ', '.join(show(v, option) for v in value)
    return f'``{value!r}``'


def _limits(opt: OptionDoc) -> Optional[str]:
    low, high = opt.values.get('min'), opt.values.get('max')
    if low is not None and high is not None:
        return f'{show(low, opt.name)} to {show(high, opt.name)}'
    if low is not None:
        return f'at least {show(low, opt.name)}'
    if high is not None:
        return f'at most {show(high, opt.name)}'
    return None


def _option_section(opt: OptionDoc) -> List[str]:
    v = opt.values
    lines = ['', *_heading(opt.name, '-'), '']
    lines += _paragraph(v.get('desc', '')) + _paragraph(v.get('long_desc', ''))
    fields: List[Tuple[str, str]] = [('Type', f"``{v.get('type', 'str')}``"),
                                     ('Default', show(v.get('default', ''), opt.name))]
    limits = _limits(opt)
    if limits:
        fields.append(('Range', limits))
    if 'enum_allowed' in v:
        fields.append(('Allowed', show(v['enum_allowed'], opt.name)))
    fields.append(('Can update at runtime', 'yes' if v.get('runtime') else 'no'))
    if 'see_also' in v:
        fields.append(('See also', ', '.join(f'`{s}`_' for s in v['see_also'])))
    fields += [(k, show(val)) for k, val in v.items() if k not in _SHOWN]
    lines += [f':{k}: {text}' for k, text in fields]
    return lines


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = '  '.join('=' * w for w in widths)
    body = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return [rule, body[0], rule, *body[1:], rule]


def _banner(what: str) -> List[str]:
    return [f'.. Generated by {SCRIPT} from {what} in rbd_migration/module.py;',
            '   edit those, then run the script.  Do not edit this file.', '']


def options_rst(opts: List[OptionDoc]) -> str:
    rows = [('option', 'type', 'default')] + [
        (f'`{o.name}`_', o.values.get('type', 'str'), show(o.values.get('default', ''), o.name))
        for o in opts]
    lines = [
        *_banner('MODULE_OPTIONS'),
        *_heading('Module options', '=', over=True), '',
        'Every option is set for the mgr, and read by the module each time it is',
        'used (the scheduling options at every scheduling pass, about once a',
        'second), so a change takes effect while tasks and batches run, unless',
        'its description below says otherwise::', '',
        '   ceph config set mgr mgr/rbd_migration/<option> <value>',
        '   ceph config get mgr mgr/rbd_migration/<option>', '',
        'To lift a limit, set it back to its default (``ceph config set mgr',
        'mgr/rbd_migration/execute_window ""``) rather than only ``ceph config rm``',
        "it: a running Pacific mgr goes on serving a removed module option's last",
        'value to the module until the mgr restarts.', '',
        'What the options do together: the `operator guide <../operator-guide.rst>`_.',
        '', *_table(rows)]
    for opt in opts:
        lines += _option_section(opt)
    return '\n'.join(lines) + '\n'


def synopsis(cmd: CommandDoc) -> str:
    """The command line as ``ceph``'s help prints it (ceph_argparse's
    ``helpstr``), with ``-i <file>`` for commands that take an input."""
    words = ['ceph', cmd.prefix]
    for p in cmd.params:
        bare = p.annotation
        if bare.startswith('Optional[') and bare.endswith(']'):
            bare = bare[len('Optional['):-1]
        if bare == 'bool':
            word = '--' + p.name.replace('_', '-')
        elif bare in ('int', 'float'):
            word = f'<{p.name}:{bare}>'
        else:
            word = f'<{p.name}>'
        words.append(word if p.required else f'[{word}]')
    if cmd.takes_input:
        words.append('[-i <file>]')
    return ' '.join(words)


def _wrap(text: str, width: int, indent: str) -> List[str]:
    lines: List[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += ' ' + word
        else:
            lines.append((indent if lines else '') + word)
    return lines


def commands_rst(cmds: List[CommandDoc]) -> str:
    rows = [('command', 'caps')] + [(f'`{c.prefix}`_', f'``{_CAPS.get(c.perm, c.perm)}``')
                                    for c in cmds]
    lines = [
        *_banner('the @command handlers'),
        *_heading('Commands', '=', over=True), '',
        'Each command as ``ceph`` prints its synopsis: ``<name>`` arguments go in',
        'this order or by name (``--object-size 8M``, dashes or underscores),',
        '``--flag`` arguments by name only, ``[...]`` ones may be left out, and',
        "``-i <file>`` (``-i -``: stdin) gives the command's input.  Every command",
        'takes ``-f json`` or ``-f json-pretty``.  What each one does, its answers',
        'and its errors: the `operator guide <../operator-guide.rst#commands>`_.', '',
        "A client needs the caps named here and no OSD caps of its own (the mgr",
        'reads and writes the images); without them a command is refused with',
        'EACCES and changes nothing.', '', *_table(rows)]
    for cmd in cmds:
        lines += ['', *_heading(cmd.prefix, '-'), '', '::', '',
                  *('   ' + line for line in _wrap(synopsis(cmd), 76, '       ')), '']
        lines += _paragraph(cmd.desc)
        lines.append(f":Caps: ``{_CAPS.get(cmd.perm, cmd.perm)}``")
    return '\n'.join(lines) + '\n'


def render(module: Path = MODULE) -> Dict[Path, str]:
    """Each generated page and what it should hold."""
    source = module.read_text()
    return {OPTIONS_DOC: options_rst(options(source)),
            COMMANDS_DOC: commands_rst(commands(source))}


def stale(pages: Optional[Dict[Path, str]] = None) -> List[Path]:
    """The generated pages whose text differs from what module.py makes."""
    return [path for path, text in (render() if pages is None else pages).items()
            if not path.exists() or path.read_text() != text]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--check', action='store_true',
                   help='change nothing; exit 1 if a page differs from what module.py makes')
    args = p.parse_args(argv)
    try:
        pages = render()
    except NotLiteral as e:
        print(f'{SCRIPT}: {e}', file=sys.stderr)
        return 2
    if args.check:
        old = stale(pages)
        for path in old:
            print(f'{path.relative_to(REPO)} is stale: run {SCRIPT}', file=sys.stderr)
        return 1 if old else 0
    for path in stale(pages):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[path])
        print(f'wrote {path.relative_to(REPO)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

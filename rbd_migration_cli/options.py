"""The command line as the rbd CLI of Ceph 16.2 parses it.

rbd parses with boost::program_options: options and positionals mix in any
order, ``--opt value``, ``--opt=value``, ``-pvalue``, ``--`` ends options,
no abbreviations, an option given twice is refused (``--image-feature``
excepted), and refusals are one line with exit status 1.  Scripts depend on
those details (an option before the command words, ``--pool`` after the
image), so this parser reproduces them, messages included, rather than
argparse's.
"""
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: rbd's status for a command line its parser refuses.
USAGE_STATUS = 1


class UsageError(Exception):
    """A command line rbd's parser refuses; printed as ``rbd: <message>``."""


class BadValue(ValueError):
    """A value an option's validator refuses.  rbd's own validators name
    only the option; boost's typed ones (plain numbers) quote the value."""

    def __init__(self, quote: bool = False) -> None:
        super().__init__('bad value')
        self.quote = quote


# -- validators: as rbd's ArgumentTypes.cc -----------------------------------

#: Feature names rbd's --image-feature parser knows (librbd refuses some later).
FEATURE_NAMES = ('layering', 'striping', 'exclusive-lock', 'object-map', 'fast-diff',
                 'deep-flatten', 'journaling', 'data-pool', 'operations', 'migrating',
                 'non-primary')
_IEC_SHIFT = {'B': 0, 'K': 10, 'M': 20, 'G': 30, 'T': 40, 'P': 50, 'E': 60}


def iec_size(text: str) -> int:
    """Bytes as Ceph's strict_iecstrtoll reads them: ``4096``, ``4K``,
    ``4M``, ``4Mi`` or ``4MB`` (the second letter is not checked), not
    ``4m`` nor ``4MiB``."""
    number = re.match(r'[-+0-9]*', text)
    digits = number.group(0) if number else ''
    unit = text[len(digits):]
    if not re.fullmatch(r'[-+]?\d+', digits) or len(unit) > 2:
        raise BadValue()
    if unit and (unit[0] not in _IEC_SHIFT or unit == 'Bi'):
        raise BadValue()
    value = int(digits)
    if value < 0:
        raise BadValue()
    return value << _IEC_SHIFT[unit[0]] if unit else value


def order(text: str) -> int:
    """``--order``: 12 to 25 (4 KiB to 32 MiB objects)."""
    if not re.fullmatch(r'\+?\d+', text) or not 12 <= int(text) <= 25:
        raise BadValue()
    return int(text)


def unsigned(text: str) -> int:
    """A plain number (boost's lexical_cast, which also takes a sign)."""
    if not re.fullmatch(r'[-+]?\d+', text):
        raise BadValue(quote=True)
    return int(text)


def image_format(text: str) -> int:
    if not re.fullmatch(r'\+?\d+', text) or int(text) not in (1, 2):
        raise BadValue()
    return int(text)


def features(text: str) -> List[str]:
    """``layering,exclusive-lock``; empty items are skipped, as rbd does."""
    names = [name for name in text.split(',') if name]
    if any(name not in FEATURE_NAMES for name in names):
        raise BadValue()
    return names


def mirror_image_mode(text: str) -> str:
    if text not in ('journal', 'snapshot'):
        raise BadValue()
    return text


def string(text: str) -> str:
    return text


# -- the option tables --------------------------------------------------------

@dataclass(frozen=True)
class Opt:
    """One option.  ``parse`` None makes it a switch."""

    name: str
    help: str
    parse: Optional[Callable[[str], Any]] = string
    short: str = ''
    #: Given more than once, the values add up (``--image-feature``).
    many: bool = False
    #: Given more than once, the last one counts (the general options,
    #: which Ceph's own argument parser reads before rbd's).
    last_wins: bool = False
    #: Other spellings Ceph accepts (config options take - or _).
    aliases: Tuple[str, ...] = ()
    #: Left out of the help, as rbd leaves it out.
    hidden: bool = False
    metavar: str = ''

    @property
    def switch(self) -> bool:
        return self.parse is None

    def spellings(self) -> List[str]:
        out = [f'--{self.name}'] + [f'--{a}' for a in self.aliases]
        return out + ([f'-{self.short}'] if self.short else [])


def _general(name: str, help: str, short: str = '', aliases: Tuple[str, ...] = ()) -> Opt:
    return Opt(name, help, short=short, last_wins=True, aliases=aliases)


GENERAL = (
    _general('conf', 'path to cluster configuration', 'c'),
    _general('cluster', 'cluster name'),
    _general('id', "client id (without 'client.' prefix)"),
    _general('name', 'client name', 'n'),
    _general('mon_host', 'monitor host', 'm', aliases=('mon-host',)),
    _general('keyfile', 'path to secret key', 'K'),
    _general('keyring', 'path to keyring', 'k'),
)


def _image(prefix: str = '', what: str = '') -> Tuple[Opt, ...]:
    return (Opt(f'{prefix}pool', f'{what}pool name', short='' if prefix else 'p'),
            Opt(f'{prefix}namespace', f'{what}namespace name'),
            Opt('dest' if prefix else 'image', f'{what}image name'))


NO_PROGRESS = Opt('no-progress', 'disable progress output', None)
NO_WAIT = Opt('no-wait', 'print the task id and return at once (not in rbd)', None)

PREPARE_OPTIONS = (
    Opt('import-only', 'only import data from source', None),
    Opt('source-spec-path', "source-spec file (or '-' for stdin)"),
    Opt('source-spec', 'source-spec'),
    *(Opt(o.name, 'source ' + o.help, short=o.short) for o in _image()),
    Opt('snap', 'source snapshot name'),
    *_image('dest-', 'destination '),
    Opt('image-format', 'image format [default: 2]', image_format),
    Opt('new-format', 'use image format 2 (deprecated)', None, hidden=True),
    Opt('order', 'object order [12 <= order <= 25] (deprecated)', order, hidden=True),
    Opt('object-size', 'object size in B/K/M [4K <= object size <= 32M]', iec_size),
    Opt('image-feature', 'image features\n[layering(+), exclusive-lock(+*),\n'
        'object-map(+*), deep-flatten(+-), journaling(*)]', features, many=True),
    Opt('image-shared', 'shared image', None),
    Opt('stripe-unit', 'stripe unit in B/K/M', iec_size),
    Opt('stripe-count', 'stripe count', unsigned),
    Opt('data-pool', 'data pool'),
    Opt('mirror-image-mode', 'mirror image mode [journal or snapshot]', mirror_image_mode),
    Opt('journal-splay-width', 'number of active journal objects', unsigned),
    Opt('journal-object-size', 'size of journal objects [4K <= size <= 64M]', iec_size),
    Opt('journal-pool', 'pool for journal objects'),
    Opt('flatten', 'fill clone with parent data (make it independent)', None),
)
IMAGE_OPTIONS = (*_image(), NO_PROGRESS, NO_WAIT)


@dataclass(frozen=True)
class Command:
    name: str
    description: str
    options: Tuple[Opt, ...]
    #: Positional slots, named as rbd's help names them.
    positionals: Tuple[Tuple[str, str], ...]


_IMAGE_SPEC = (('image-spec', 'image specification\n(example: '
                '[<pool-name>/[<namespace>/]]<image-name>)'),)

COMMANDS: Dict[str, Command] = {c.name: c for c in (
    Command('prepare', 'Prepare image migration.', PREPARE_OPTIONS, (
        ('source-image-or-snap-spec', 'source image or snapshot specification\n(example: '
         '[<pool-name>/[<namespace>/]]<image-name>[@<snap-name>])'),
        ('dest-image-spec', 'destination image specification\n(example: '
         '[<pool-name>/[<namespace>/]]<image-name>)'))),
    Command('execute', 'Execute image migration.', IMAGE_OPTIONS, _IMAGE_SPEC),
    Command('commit', 'Commit image migration.',
            (*_image(), NO_PROGRESS, Opt('force', 'proceed even if the image has children',
                                         None), NO_WAIT), _IMAGE_SPEC),
    Command('abort', 'Cancel interrupted image migration.', IMAGE_OPTIONS, _IMAGE_SPEC),
)}


# -- parsing -------------------------------------------------------------------

@dataclass
class Parsed:
    """A command line, parsed: option values by long name (switches True,
    ``--image-feature`` a list), positionals in order."""

    command: str
    values: Dict[str, Any] = field(default_factory=dict)
    positionals: List[str] = field(default_factory=list)
    help: bool = False


def _table(options: Sequence[Opt]) -> Dict[str, Opt]:
    return {spelling: opt for opt in options for spelling in opt.spellings()}


def _all_options() -> Dict[str, Opt]:
    every: List[Opt] = list(GENERAL)
    for command in COMMANDS.values():
        every += command.options
    return _table(every)


def _lookup(token: str, table: Dict[str, Opt]) -> Tuple[Optional[Opt], Optional[str]]:
    """The option a token names and the value attached to it, if any."""
    if token.startswith('--'):
        name, eq, attached = token.partition('=')
        return table.get(name), (attached if eq else None)
    return table.get(token[:2]), (token[2:] or None)


def _is_option(token: str) -> bool:
    return token.startswith('-') and token != '-'


def split_command(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The command words (``[migration] prepare``, ``help prepare``) and the
    other tokens.  rbd finds its command words anywhere, skipping the values
    of options that take one, so ``-p rbd2 migration execute vm`` works."""
    table = _all_options()
    words: List[str] = []
    rest: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == '--':
            rest += argv[i - 1:]
            break
        if _is_option(token):
            rest.append(token)
            opt, attached = _lookup(token, table)
            if opt is not None and not opt.switch and attached is None and i < len(argv) \
                    and _lookup(argv[i], table)[0] is None:
                rest.append(argv[i])
                i += 1
        elif _wants_word(words, token):
            words.append(token)
        else:
            rest.append(token)
    return words, rest


def _wants_word(words: List[str], token: str) -> bool:
    """Whether a bare token is one of the command words."""
    if not words:
        return True
    if words == ['migration']:
        return True
    return words[0] == 'help' and len(words) < 3


def parse(argv: Sequence[str]) -> Parsed:
    """Parse a whole command line."""
    words, rest = split_command(argv)
    if words and words[0] == 'help':
        return Parsed(command=_command_of(words[1:] or ['']), help=True)
    if not words:
        raise UsageError('no command given; use one of: ' + ', '.join(COMMANDS))
    name = _command_of(words)
    wants_help = any(t in ('-h', '--help') for t in rest)
    if wants_help:
        return Parsed(command=name, help=True)
    return parse_command(name, rest)


def _command_of(words: List[str]) -> str:
    """``prepare`` from ``[migration] prepare``; '' asks for the overview."""
    if words and words[0] == 'migration':
        words = words[1:]
    if words == [''] or not words:
        return ''
    if len(words) == 1 and words[0] in COMMANDS:
        return words[0]
    raise UsageError(f"unknown command '{' '.join(words)}'; use one of: "
                     + ', '.join(COMMANDS))


def parse_command(name: str, tokens: Sequence[str]) -> Parsed:
    """One command's tokens: syntax first (unknown options, missing values,
    too many positionals), then each value checked and stored, as boost
    does."""
    command = COMMANDS[name]
    table = _table((*GENERAL, *command.options))
    given, positionals = _tokens(tokens, table)
    if len(positionals) > len(command.positionals):
        raise UsageError('too many arguments')
    parsed = Parsed(command=name, positionals=positionals)
    for opt, text in given:
        _store(parsed.values, opt, text)
    return parsed


def _tokens(tokens: Sequence[str], table: Dict[str, Opt]
            ) -> Tuple[List[Tuple[Opt, Optional[str]]], List[str]]:
    given: List[Tuple[Opt, Optional[str]]] = []
    positionals: List[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == '--':
            positionals += tokens[i:]
            break
        if not _is_option(token):
            positionals.append(token)
            continue
        opt, value = _lookup(token, table)
        if opt is None:
            raise UsageError(f"unrecognised option '{token.partition('=')[0]}'")
        if opt.switch and value is not None:
            raise UsageError(f"option '--{opt.name}' does not take any arguments")
        if not opt.switch and value is None:
            # boost takes the next token as the value unless it is an option
            # this command knows (so `--stripe-count -1` is a value).
            if i >= len(tokens) or _lookup(tokens[i], table)[0] is not None:
                raise UsageError(f"the required argument for option '--{opt.name}' "
                                 'is missing')
            value = tokens[i]
            i += 1
        given.append((opt, value))
    return given, positionals


def _store(values: Dict[str, Any], opt: Opt, text: Optional[str]) -> None:
    if opt.name in values and not (opt.many or opt.last_wins):
        raise UsageError(f"option '--{opt.name}' cannot be specified more than once")
    if opt.parse is None:
        values[opt.name] = True
        return
    assert text is not None
    try:
        value = opt.parse(text)
    except BadValue as e:
        shown = f" ('{text}')" if e.quote else ''
        raise UsageError(f"the argument{shown} for option '--{opt.name}' is invalid")
    if opt.many:
        values.setdefault(opt.name, []).extend(value)
    else:
        values[opt.name] = value


def general_from_env(ceph_args: str) -> Dict[str, str]:
    """The general options ``CEPH_ARGS`` gives (``--id``, ``--keyring`` ...),
    which the command line overrides.  Anything else in it is left to
    librados, which reads ``CEPH_ARGS`` itself, as every Ceph tool does."""
    table = _table(GENERAL)
    tokens = shlex.split(ceph_args)
    found: Dict[str, str] = {}
    i = 0
    while i < len(tokens):
        opt, value = _lookup(tokens[i], table) if _is_option(tokens[i]) else (None, None)
        i += 1
        if opt is None:
            continue
        if value is None and i < len(tokens):
            value = tokens[i]
            i += 1
        if value is not None:
            found[opt.name] = value
    return found


# -- help ------------------------------------------------------------------------

def usage(name: str) -> str:
    """``rbd-migration help <command>``, laid out as ``rbd help migration <command>``."""
    if not name:
        return _overview()
    command = COMMANDS[name]
    shown = [o for o in command.options if not o.hidden]
    items = [f'[--{o.name}' + ('' if o.switch else f' <{o.name}>') + ']'
             for o in command.options] + [f'<{p}>' for p, _ in command.positionals]
    head = f'usage: rbd-migration {name} '
    lines = [line.replace('\0', ' ') for line in textwrap.wrap(
        ' '.join(item.replace(' ', '\0') for item in items), 79, initial_indent=head,
        subsequent_indent=' ' * len(head), break_on_hyphens=False)]
    lines += ['', command.description, '', 'Positional arguments']
    lines += _described([(f'<{p}>', text) for p, text in command.positionals])
    lines += ['', 'Optional arguments']
    lines += _described([(_flags(o), o.help) for o in shown])
    lines += ['', 'General options (as rbd takes them)']
    lines += _described([(_flags(o), o.help) for o in GENERAL])
    if name == 'prepare':
        lines += ['', 'Refused, as the module cannot honour them: --mirror-image-mode, '
                  '--journal-*,', '--image-format 1, --image-shared without --image-feature.']
    return '\n'.join(lines) + '\n'


def _flags(opt: Opt) -> str:
    text = f'-{opt.short} [ --{opt.name} ]' if opt.short else f'--{opt.name}'
    return text + ('' if opt.switch else ' arg')


def _described(rows: List[Tuple[str, str]]) -> List[str]:
    out = []
    for left, text in rows:
        first, *more = text.split('\n')
        out.append(f'  {left:<28} {first}')
        out += [f'  {"":<28} {line}' for line in more]
    return out


def _overview() -> str:
    lines = ['usage: rbd-migration [migration] <command> ...', '',
             "rbd migration's commands, run by the rbd_migration mgr module.", '',
             'Commands:']
    lines += [f'  {c.name:<10} {c.description}' for c in COMMANDS.values()]
    lines += ['', "See 'rbd-migration help <command>' for help on a command."]
    return '\n'.join(lines) + '\n'

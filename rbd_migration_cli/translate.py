"""From rbd's arguments to the module's commands.

What an rbd command line means is decided here, as rbd 16.2 decides it
(tools/rbd/Utils.cc get_pool_image_snapshot_names, action/Migration.cc), so
that a script gets the same target: a ``--image`` option leaves the
positional to the next image spec, a destination without a pool goes to the
default pool (not the source's), an import's target is the *first* image
spec.  Options the module cannot honour are refused, one line each, never
dropped.
"""
import errno
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .options import Parsed

#: Module command prefixes, by rbd command.
PREFIX = {name: f'rbd migration {name}' for name in ('prepare', 'execute', 'commit', 'abort')}
#: Features only one client may use at a time; --image-shared drops them.
SINGLE_CLIENT_FEATURES = ('exclusive-lock', 'object-map', 'fast-diff', 'journaling')


class Refused(Exception):
    """A command refused before it reaches the module: one line, printed
    as is, and an errno as the exit status (rbd's -EINVAL and friends)."""

    def __init__(self, line: str, status: int = errno.EINVAL) -> None:
        super().__init__(line)
        self.line = line
        self.status = status


def refuse_option(option: str, why: str) -> Refused:
    """One of rbd's options that this client cannot honour."""
    return Refused(f'rbd-migration: {option}: {why}')


# -- image specs --------------------------------------------------------------

#: rbd's patterns: names may hold '/' and '@' unless validated in full
#: (a spec that creates an image is).
_SPEC = {False: re.compile(r'(?:([^/]+)/(?:([^/]+)/)?)?([^@]+)(?:@(.+))?'),
         True: re.compile(r'(?:([^/@]+)/(?:([^/@]+)/)?)?([^/@]+)(?:@([^/@]+))?')}
_NAME = re.compile(r'[^@/]+')


@dataclass(frozen=True)
class Names:
    pool: str = ''
    namespace: str = ''
    image: str = ''
    snap: str = ''

    def spec(self, default_pool: str) -> str:
        """``pool/[namespace/]image``, the pool defaulted as rbd does it."""
        ns = f'{self.namespace}/' if self.namespace else ''
        return f'{self.pool or default_pool}/{ns}{self.image}'


@dataclass(frozen=True)
class Role:
    """Which options name an image spec, and what it may hold."""

    pool: str
    namespace: str
    image: str
    snap: Optional[str]         # the --snap option; None: no snapshot allowed
    full: bool                  # validate names in full (an image to create)


SOURCE = Role('pool', 'namespace', 'image', None, False)
IMPORT_SOURCE = Role('pool', 'namespace', 'image', 'snap', False)
DEST = Role('dest-pool', 'dest-namespace', 'dest', None, True)


def names(parsed: Parsed, index: int, role: Role) -> Tuple[Names, int]:
    """An image spec from its options or, when no image name was given as
    an option, from the next positional (rbd's get_pool_image_snapshot_names:
    the positional is used only then, and the index moves only then)."""
    v = parsed.values
    pool, namespace = v.get(role.pool, ''), v.get(role.namespace, '')
    image = v.get(role.image, '')
    snap = v.get(role.snap, '') if role.snap else ''
    if not image:
        text = parsed.positionals[index] if index < len(parsed.positionals) else ''
        index += 1
        if text:
            pool, namespace, image, snap = _extract(text, (pool, namespace, snap), role)
    if role.full:
        for what, value in (('pool', pool), ('namespace', namespace)):
            if value and not _NAME.fullmatch(value):
                raise Refused(f"rbd: invalid {what} name '{value}'")
    return Names(pool, namespace, image, snap), index


def _extract(text: str, given: Tuple[str, str, str], role: Role) -> Tuple[str, str, str, str]:
    m = _SPEC[role.full].fullmatch(text)
    if not m:
        raise Refused(f"rbd: invalid spec '{text}'")
    pool, namespace, snap = given
    image = m.group(3)
    if m.group(4) is not None and role.snap is None:
        raise Refused("rbd: snapshot name specified for a command that doesn't use it")
    return (m.group(1) or pool, m.group(2) or namespace, image,
            m.group(4) if m.group(4) is not None else snap)


def required(n: Names, message: str = 'rbd: image name was not specified') -> Names:
    if not n.image:
        raise Refused(message)
    return n


# -- what the module is asked -------------------------------------------------

@dataclass
class Plan:
    """A module command, ready but for the default pool, which only the
    connected client knows (``rbd_default_pool``)."""

    action: str
    args: Dict[str, Any] = field(default_factory=dict)
    #: Module arguments that are image specs, completed with the default pool.
    specs: Dict[str, Names] = field(default_factory=dict)
    #: The source-spec, sent as the command's input (never logged by the mon).
    source_spec: Optional[bytes] = None
    #: ``--import-only SRC@SNAP``: a native source-spec built from these names.
    native_source: Optional[Names] = None
    import_only: bool = False
    wait: bool = True
    progress: bool = True
    warnings: List[str] = field(default_factory=list)

    def command(self, default_pool: str) -> Tuple[Dict[str, Any], bytes]:
        """The module command (JSON for ``mgr_command``) and its input."""
        cmd: Dict[str, Any] = {'prefix': PREFIX[self.action], 'format': 'json'}
        cmd.update({key: n.spec(default_pool) for key, n in self.specs.items()})
        cmd.update(self.args)
        inbuf = self.source_spec or b''
        if self.native_source is not None:
            inbuf = native_spec(self.native_source, default_pool).encode()
        return cmd, inbuf


def native_spec(src: Names, default_pool: str) -> str:
    """The source-spec rbd builds for ``--import-only POOL/IMAGE@SNAP``, by
    pool name (rbd writes the pool's id; the module takes either)."""
    return json.dumps({'type': 'native', 'pool_name': src.pool or default_pool,
                       'pool_namespace': src.namespace, 'image_name': src.image,
                       'snap_name': src.snap})


def plan(parsed: Parsed, read: Callable[[str], bytes]) -> Plan:
    """The module command for a parsed rbd command line; ``read`` reads a
    ``--source-spec-path`` ('-' is stdin)."""
    if parsed.command == 'prepare':
        return _prepare(parsed, read)
    target = required(names(parsed, 0, SOURCE)[0])
    p = Plan(parsed.command, specs={'image_spec': target},
             progress=not parsed.values.get('no-progress'),
             wait=not parsed.values.get('no-wait'))
    if parsed.values.get('force'):
        p.args['force'] = True
    return p


def _prepare(parsed: Parsed, read: Callable[[str], bytes]) -> Plan:
    v = parsed.values
    import_only = bool(v.get('import-only'))
    src, index = names(parsed, 0, IMPORT_SOURCE if import_only else SOURCE)
    if not import_only and v.get('snap'):
        raise refuse_option('--snap', 'names a snapshot only with --import-only '
                            '(rbd would ignore it here)')
    src = required(src)
    dst, after = names(parsed, index, DEST)
    spec = _source_spec(v, read) or None      # an empty one is none, as in rbd
    p = Plan('prepare', args=layout(v), import_only=import_only, warnings=warnings_for(v))
    if import_only and spec is None:
        if not src.snap:
            raise Refused('rbd: snapshot name was not specified')
        p.native_source = src
        p.specs['dest_image_spec'] = required(
            dst, 'rbd: destination image name must be provided')
    elif not import_only and spec is not None:
        raise Refused('rbd: --import-only must be used in combination with '
                      'source-spec/source-spec-path')
    elif import_only:
        if src.snap:
            raise Refused("rbd: snapshot name specified for a command that doesn't use it")
        p.source_spec = spec
        p.specs['dest_image_spec'] = src
        used = parsed.positionals[index] if after > index and index < len(
            parsed.positionals) else None
        p.warnings += _unused_destination(parsed, used)
    else:
        p.specs['source_image_spec'] = src
        p.specs['dest_image_spec'] = Names(dst.pool, dst.namespace, dst.image or src.image)
    if import_only:
        p.args['import_only'] = True
    return p


def _unused_destination(parsed: Parsed, positional: Optional[str]) -> List[str]:
    """With a source-spec, rbd creates the image the first spec names and
    never looks at the destination options: said, so nobody is surprised."""
    given = [f'--{o}' for o in ('dest-pool', 'dest-namespace', 'dest') if parsed.values.get(o)]
    if positional:
        given.append(f"'{positional}'")
    if not given:
        return []
    return [f"rbd-migration: warning: with a source-spec the first image spec names "
            f"the target (as rbd has it); {', '.join(given)} not used"]


def _source_spec(v: Dict[str, Any], read: Callable[[str], bytes]) -> Optional[bytes]:
    if 'source-spec' in v and 'source-spec-path' in v:
        raise Refused('rbd: cannot specify both source-spec and source-spec-path')
    if 'source-spec-path' in v:
        path = v['source-spec-path']
        try:
            return read(path)
        except OSError as e:
            raise Refused(f'rbd: error opening {path}', e.errno or errno.EIO)
    if 'source-spec' in v:
        return str(v['source-spec']).encode()
    return None


# -- layout options -----------------------------------------------------------

#: rbd options the module has no counterpart for, and what to do instead.
UNSUPPORTED = {
    'mirror-image-mode': 'the module cannot enable mirroring on the target; '
                         'run rbd mirror image enable once the migration is committed',
    'journal-splay-width': 'the module cannot set journal options; leave them to the '
                           "pool's defaults (rbd_journal_* in ceph config)",
    'journal-object-size': 'the module cannot set journal options; leave them to the '
                           "pool's defaults (rbd_journal_* in ceph config)",
    'journal-pool': 'the module cannot set journal options; leave them to the '
                    "pool's defaults (rbd_journal_pool in ceph config)",
}


def layout(v: Dict[str, Any]) -> Dict[str, Any]:
    """The module's layout arguments for rbd's image options."""
    for name, why in UNSUPPORTED.items():
        if name in v:
            raise refuse_option(f'--{name}', why)
    if v.get('image-format') == 1:
        raise refuse_option('--image-format 1', 'the module creates format 2 images '
                            'only (format 1 cannot be migrated); drop the option')
    out: Dict[str, Any] = {}
    if 'order' in v:            # rbd takes --order over --object-size
        out['order'] = v['order']
    elif 'object-size' in v:
        out['object_size'] = str(_rounded_object_size(v['object-size']))
    feature_list = _features(v)
    if feature_list is not None:
        out['features'] = ','.join(feature_list)
    if 'stripe-unit' in v:
        out['stripe_unit'] = str(v['stripe-unit'])
    if 'stripe-count' in v:
        out['stripe_count'] = v['stripe-count']
    if v.get('data-pool'):
        out['data_pool'] = v['data-pool']
    if v.get('flatten'):
        out['flatten'] = True
    return out


def _rounded_object_size(size: int) -> int:
    """rbd turns an object size into the nearest order (2^order bytes)."""
    if size <= 0:
        raise Refused("rbd: the argument for option '--object-size' is invalid", 1)
    return 1 << int(math.floor(math.log2(size) + 0.5))


def _features(v: Dict[str, Any]) -> Optional[List[str]]:
    """``--image-feature`` (all of them), less what ``--image-shared``
    drops.  Without features rbd clears the shared ones from the defaults,
    which only the module's librbd knows: refused, so it is not lost."""
    given = v.get('image-feature')
    if v.get('image-shared'):
        if given is None:
            raise refuse_option('--image-shared', 'needs --image-feature here: the module '
                                'cannot clear features from the defaults; name the '
                                'features, e.g. --image-feature layering,deep-flatten')
        given = [f for f in given if f not in SINGLE_CLIENT_FEATURES]
    if given is None:
        return None
    return list(dict.fromkeys(given))


def warnings_for(v: Dict[str, Any]) -> List[str]:
    """The warnings rbd itself prints for deprecated options."""
    out = []
    if 'order' in v:
        out.append('rbd: --order is deprecated, use --object-size')
    return out

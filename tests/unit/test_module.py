"""module.py on the mgr's real ``mgr_module`` over a stand-in for ceph-mgr
(tests/mgrstub.py): the command table it declares, how arguments reach
the handlers, and the one wrapper for errors, secrets and output format."""
import errno
import json
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest

from rbd_migration.errors import NotFound
from tests import mgrstub

module = mgrstub.install()

#: The command-line contract (what `ceph rbd migration ...` and the drop-in
#: CLI send): name, type, required, per command.  A change here is a change
#: for every script that calls the module.
LAYOUT = [('object_size', 'CephString', False), ('order', 'CephInt', False),
          ('features', 'CephString', False), ('stripe_unit', 'CephString', False),
          ('stripe_count', 'CephInt', False), ('data_pool', 'CephString', False),
          ('flatten', 'CephBool', False)]
CONTRACT: Dict[str, Tuple[str, List[Tuple[str, str, bool]]]] = {
    'rbd migration prepare': ('w', [
        ('source_image_spec', 'CephString', False), ('dest_image_spec', 'CephString', False),
        ('import_only', 'CephBool', False), ('source_spec', 'CephString', False), *LAYOUT]),
    'rbd migration execute': ('w', [('image_spec', 'CephString', True)]),
    'rbd migration commit': ('w', [('image_spec', 'CephString', True),
                                   ('force', 'CephBool', False),
                                   ('verified', 'CephBool', False)]),
    'rbd migration verify': ('w', [('image_spec', 'CephString', True)]),
    'rbd migration abort': ('w', [('image_spec', 'CephString', True)]),
    'rbd migration status': ('r', [('image_spec', 'CephString', False)]),
    'rbd migration batch prepare': ('w', [
        ('source_pool_spec', 'CephString', True), ('dest_pool_spec', 'CephString', True),
        ('pattern', 'CephString', False), ('dry_run', 'CephBool', False),
        ('auto_commit', 'CephBool', False), ('verify_before_commit', 'CephBool', False),
        *LAYOUT]),
    'rbd migration batch status': ('r', [('batch_id', 'CephString', False)]),
    'rbd migration batch cancel': ('w', [('batch_id', 'CephString', True)]),
    'rbd migration batch commit': ('w', [('batch_id', 'CephString', True)]),
    'rbd migration metrics': ('r', []),
    'rbd migration task list': ('r', []),
    'rbd migration task cancel': ('w', [('task_id', 'CephString', True)]),
    'rbd migration task get': ('r', [('task_id', 'CephString', True)]),
}


def _parsed(descriptor: Dict[str, str]) -> Tuple[str, List[Tuple[str, str, bool]]]:
    words = descriptor['cmd'].split()
    args = []
    for word in words:
        if '=' not in word:
            continue
        fields = dict(kv.split('=', 1) for kv in word.split(','))
        args.append((fields['name'], fields['type'], fields.get('req') != 'false'))
    return descriptor['perm'], args


def test_the_command_table_is_the_contract() -> None:
    declared = {' '.join(w for w in d['cmd'].split() if '=' not in w): _parsed(d)
                for d in module.Module.COMMANDS}
    assert declared == CONTRACT
    assert all(d['desc'] and '  ' not in d['desc'] for d in module.Module.COMMANDS)


class Recorder:
    """Stands in for the services and the read side: records each call, answers
    what it was told to (or raises it)."""

    engine: Any

    def __init__(self, answer: Any = None) -> None:
        self.calls: List[Tuple[str, Tuple[Any, ...], Dict[str, Any]]] = []
        self.answer = answer if answer is not None else {'message': 'done'}

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer
        return call


def _module(answer: Any = None) -> Tuple[Any, Recorder]:
    mod = module.Module('rbd_migration', None, None)
    recorder = Recorder(answer)
    recorder.engine = SimpleNamespace(rados=None)
    mod.service = recorder
    mod.batches = recorder
    mod.reports = recorder
    mod._ready.set()
    return mod, recorder


def _run(mod: Any, inbuf: Optional[str] = None, **cmd: Any) -> Tuple[int, str, str]:
    return mod._answer(cmd, inbuf)


def test_an_argument_that_looks_like_a_keyword_stays_a_value() -> None:
    """mgr_module's CLICommand reads ``auto_commit=*`` as the keyword
    auto_commit once a value has that form; here every value is taken by
    its own name."""
    mod, rec = _module()
    _run(mod, prefix='rbd migration batch prepare', source_pool_spec='rbd',
         dest_pool_spec='rbd2', pattern='auto_commit=*', dry_run=True, format='json')
    name, args, kwargs = rec.calls[0]
    assert name == 'batch_prepare' and args[:2] == ('rbd', 'rbd2')
    assert kwargs['pattern'] == 'auto_commit=*'
    assert kwargs['auto_commit'] is False and kwargs['dry_run'] is True
    # The pitfall, shown on the mgr's own decorator.
    from mgr_module import CLICommand
    cli = CLICommand('pitfall')

    def handler(_: Any, pattern: Optional[str] = None, auto_commit: bool = False) -> Any:
        return pattern, auto_commit
    cli(handler)
    assert cli._collect_args_by_argspec({'pattern': 'auto_commit=*'}) == {'auto_commit': '*'}
    del CLICommand.COMMANDS['pitfall']


def test_prepare_takes_the_layout_and_the_source_spec_from_a_file() -> None:
    mod, rec = _module()
    _run(mod, '{"type": "raw"}', prefix='rbd migration prepare',
         source_image_spec='rbd/new', import_only=True, order=23, stripe_unit='64K',
         stripe_count=4, format='json')
    name, args, kwargs = rec.calls[0]
    assert name == 'prepare' and args[:2] == ('rbd/new', None)
    layout = args[2]
    assert (layout.order, layout.stripe_unit, layout.stripe_count) == (23, 65536, 4)
    assert kwargs == {'import_only': True, 'source_spec': '{"type": "raw"}'}


def test_prepare_refuses_the_source_spec_given_twice() -> None:
    mod, rec = _module()
    code, out, err = _run(mod, '{"type": "raw"}', prefix='rbd migration prepare',
                          source_image_spec='rbd/new', import_only=True,
                          source_spec='{"type": "raw"}')
    assert (code, out) == (-errno.EINVAL, '') and rec.calls == []
    assert err == '--source-spec and -i: give the source-spec one way'


def test_errors_are_one_line_with_their_errno() -> None:
    mod, _ = _module(NotFound("image 'rbd/x' does not exist"))
    assert _run(mod, prefix='rbd migration execute', image_spec='rbd/x') == (
        -errno.ENOENT, '', "image 'rbd/x' does not exist")


def test_a_bug_is_one_line_and_never_shows_a_secret() -> None:
    secret = 'Sup3r-s3cret-key'
    mod, _ = _module(RuntimeError(f'boom with {secret}'))
    spec = json.dumps({'type': 'raw', 'stream': {'type': 's3', 'url': 'http://h/b/k',
                                                 'access_key': 'AK', 'secret_key': secret}})
    code, out, err = _run(mod, prefix='rbd migration prepare', source_image_spec='rbd/new',
                          import_only=True, source_spec=spec)
    assert code == -errno.EIO and out == ''
    assert err.startswith('internal error: RuntimeError: boom with ')
    assert secret not in err and '\n' not in err


@pytest.mark.parametrize('fmt', [None, 'plain', 'json', 'json-pretty'])
def test_answers_are_rendered_per_command_or_given_as_json(fmt: Optional[str]) -> None:
    answer: Dict[str, Any] = {'tasks': []}
    mod, _ = _module(answer)
    code, out, err = _run(mod, prefix='rbd migration task list', format=fmt)
    assert (code, err) == (0, '')
    assert out == ('no tasks' if fmt in (None, 'plain') else
                   json.dumps(answer, indent=2 if fmt == 'json-pretty' else None))


@pytest.mark.parametrize('cmd, subject', [
    ({'prefix': 'rbd migration prepare', 'source_image_spec': 'a', 'dest_image_spec': 'p/b'},
     'p/b'),
    ({'prefix': 'rbd migration prepare', 'source_image_spec': 'p/b', 'import_only': True},
     'p/b'),
    ({'prefix': 'rbd migration abort', 'image_spec': 'img'}, 'rbd/img'),
    ({'prefix': 'rbd migration batch cancel', 'batch_id': '1'}, 'batches'),
    ({'prefix': 'rbd migration batch status'}, None),
    ({'prefix': 'rbd migration task cancel', 'task_id': '3'}, None),
    ({'prefix': 'rbd migration status', 'image_spec': 'img'}, None),
])
def test_what_a_command_changes(cmd: Dict[str, Any], subject: Optional[str]) -> None:
    assert module._subject(cmd) == subject

"""rbd-migration reads rbd migration's command lines as rbd 16.2 reads
them, asks the module the matching command, and answers as rbd would.

The expectations about rbd's own behaviour (messages, exit statuses, which
image a spec names) were checked against ``rbd`` 16.2.15 on a test cluster.
"""
import errno
import io
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest

from rbd_migration_cli.main import run
from rbd_migration_cli.options import UsageError, general_from_env, iec_size, parse, usage
from rbd_migration_cli.session import (Backoff, Clock, Progress, Reply, ask, task_progress,
                                       wait_task)
from rbd_migration_cli.translate import Plan, Refused, plan


def no_file(path: str) -> bytes:
    raise AssertionError(f'read {path}')


def command(*argv: str, default_pool: str = 'rbd',
            read: Any = no_file) -> Tuple[Dict[str, Any], bytes]:
    return plan(parse(argv), read).command(default_pool)


def refused(*argv: str, read: Any = no_file) -> Refused:
    with pytest.raises(Refused) as e:
        plan(parse(argv), read)
    return e.value


def usage_error(*argv: str) -> str:
    with pytest.raises(UsageError) as e:
        parse(argv)
    return str(e.value)


# -- the command line, as boost::program_options reads it for rbd -------------

@pytest.mark.parametrize('argv', [
    ['execute', 'rbd2/vm'],
    ['migration', 'execute', 'rbd2/vm'],
    ['-p', 'rbd2', 'migration', 'execute', 'vm'],
    ['migration', '-p', 'rbd2', 'execute', 'vm'],
    ['execute', 'vm', '--pool', 'rbd2'],
    ['execute', '--pool=rbd2', 'vm'],
    ['execute', '-prbd2', 'vm'],
    ['execute', '--image', 'vm', '-p', 'rbd2'],
    ['execute', '--', 'rbd2/vm'],
])
def test_options_and_image_specs_go_anywhere_as_in_rbd(argv: List[str]) -> None:
    assert command(*argv)[0] == {'prefix': 'rbd migration execute',
                                 'image_spec': 'rbd2/vm', 'format': 'json'}


def test_a_spec_names_its_own_pool_over_the_pool_option() -> None:
    assert command('execute', '-p', 'rbd2', 'rbd/vm')[0]['image_spec'] == 'rbd/vm'
    assert command('execute', '--namespace', 'ns', 'vm')[0]['image_spec'] == 'rbd/ns/vm'
    assert command('abort', 'rbd2/ns/vm')[0]['image_spec'] == 'rbd2/ns/vm'


def test_an_image_option_leaves_the_positional_unused() -> None:
    """rbd takes the positional only when no --image is given (and ignores
    an unused one)."""
    assert command('execute', '--image', 'vm', '--pool', 'rbd2', 'extra')[0][
        'image_spec'] == 'rbd2/vm'


@pytest.mark.parametrize('argv, message', [
    (['execute', '--no-prog', 'vm'], "unrecognised option '--no-prog'"),
    (['execute', '--force', 'vm'], "unrecognised option '--force'"),
    (['execute', 'vm', '--pool'], "the required argument for option '--pool' is missing"),
    (['execute', '-p'], "the required argument for option '--pool' is missing"),
    (['execute', '--pool', '--image', 'vm'],
     "the required argument for option '--pool' is missing"),
    (['prepare', '--image-shared=1', 'a'], "option '--image-shared' does not take any arguments"),
    (['execute', '--no-progress', '--no-progress', 'vm'],
     "option '--no-progress' cannot be specified more than once"),
    (['execute', '-p', 'a', '-p', 'b', 'vm'], "option '--pool' cannot be specified more than once"),
    (['execute', 'a', 'b'], 'too many arguments'),
    (['prepare', 'a', 'b', 'c'], 'too many arguments'),
    (['prepare', '--order', '30', 'a'], "the argument for option '--order' is invalid"),
    (['prepare', '--order', 'x', 'a'], "the argument for option '--order' is invalid"),
    (['prepare', '--object-size', '4m', 'a'], "the argument for option '--object-size' is invalid"),
    (['prepare', '--object-size', '1KiB', 'a'],
     "the argument for option '--object-size' is invalid"),
    (['prepare', '--image-feature', 'bogus', 'a'],
     "the argument for option '--image-feature' is invalid"),
    (['prepare', '--image-format', '3', 'a'], "the argument for option '--image-format' is invalid"),
    (['prepare', '--stripe-count', 'x', 'a'],
     "the argument ('x') for option '--stripe-count' is invalid"),
    (['prepare', '--mirror-image-mode', 'foo', 'a'],
     "the argument for option '--mirror-image-mode' is invalid"),
    (['frobnicate', 'a'], "unknown command 'frobnicate'; use one of: prepare, execute, commit, "
                          'abort'),
])
def test_refusals_of_rbds_parser_read_as_rbds(argv: List[str], message: str) -> None:
    assert usage_error(*argv) == message


def test_a_value_may_look_like_a_number_option() -> None:
    """boost takes the next token as the value unless it is a known option."""
    assert parse(['prepare', '--stripe-count', '-1', 'a']).values['stripe-count'] == -1


def test_image_features_add_up_and_the_general_options_last_one_counts() -> None:
    p = parse(['prepare', '--image-feature', 'layering', '--image-feature',
               'exclusive-lock,,object-map', '--id', 'a', '--id', 'b', 'x'])
    assert p.values['image-feature'] == ['layering', 'exclusive-lock', 'object-map']
    assert p.values['id'] == 'b'


@pytest.mark.parametrize('text, size', [
    ('4096', 4096), ('4K', 4096), ('4M', 4 << 20), ('4Mi', 4 << 20), ('4MB', 4 << 20),
    ('+4M', 4 << 20), ('4B', 4), ('0', 0), ('1G', 1 << 30)])
def test_sizes_read_as_cephs_strict_iecstrtoll(text: str, size: int) -> None:
    assert iec_size(text) == size


def test_general_options_parse_with_every_command() -> None:
    p = parse(['-c', '/etc/ceph/x.conf', '--cluster', 'x', '--id', 'admin', '-k', '/k',
               '--keyfile', '/f', '-m', '10.0.0.1', 'migration', 'commit', 'vm'])
    assert {k: p.values[k] for k in ('conf', 'cluster', 'id', 'keyring', 'keyfile',
                                     'mon_host')} == {
        'conf': '/etc/ceph/x.conf', 'cluster': 'x', 'id': 'admin', 'keyring': '/k',
        'keyfile': '/f', 'mon_host': '10.0.0.1'}
    assert parse(['--name', 'client.x', 'abort', 'vm']).values['name'] == 'client.x'


def test_ceph_args_give_general_options_and_leave_the_rest_to_librados() -> None:
    assert general_from_env('--id foo --debug-ms 1 --keyring=/k -c /c.conf') == {
        'id': 'foo', 'keyring': '/k', 'conf': '/c.conf'}


@pytest.mark.parametrize('argv', [['help', 'prepare'], ['help', 'migration', 'prepare'],
                                  ['prepare', '--help'], ['migration', 'prepare', '-h']])
def test_help_names_every_option_of_rbds(argv: List[str]) -> None:
    p = parse(argv)
    assert p.help and p.command == 'prepare'
    text = usage('prepare')
    for option in ('--import-only', '--source-spec-path', '--source-spec', '--pool',
                   '--namespace', '--image', '--snap', '--dest-pool', '--dest-namespace',
                   '--dest', '--image-format', '--object-size', '--image-feature',
                   '--image-shared', '--stripe-unit', '--stripe-count', '--data-pool',
                   '--mirror-image-mode', '--journal-splay-width', '--journal-object-size',
                   '--journal-pool', '--flatten', '--conf', '--id', '--name', '--keyring',
                   '--cluster'):
        assert option in text, option


# -- which images, as rbd 16.2 decides ----------------------------------------

def test_prepare_sends_both_image_specs_in_full() -> None:
    cmd, inbuf = command('prepare', 'rbd/vm', 'rbd2/ns/vm')
    assert cmd == {'prefix': 'rbd migration prepare', 'format': 'json',
                   'source_image_spec': 'rbd/vm', 'dest_image_spec': 'rbd2/ns/vm'}
    assert inbuf == b''


def test_a_destination_without_a_pool_goes_to_the_default_pool_not_the_sources() -> None:
    """rbd 16.2: `prepare rbd2/a` moves rbd2/a to rbd/a; `prepare rbd2/a b`
    to rbd/b (the module alone would keep the pool: the client says it)."""
    assert command('prepare', 'rbd2/a')[0]['dest_image_spec'] == 'rbd/a'
    assert command('prepare', 'rbd2/a', 'b')[0]['dest_image_spec'] == 'rbd/b'
    assert command('prepare', 'rbd2/a', default_pool='fast')[0]['dest_image_spec'] == 'fast/a'
    assert command('prepare', 'a', default_pool='fast')[0]['source_image_spec'] == 'fast/a'


def test_destination_options() -> None:
    cmd = command('prepare', '--pool', 'rbd2', '--image', 'a', '--dest-pool', 'rbd',
                  '--dest-namespace', 'ns', '--dest', 'b')[0]
    assert (cmd['source_image_spec'], cmd['dest_image_spec']) == ('rbd2/a', 'rbd/ns/b')
    cmd = command('prepare', '--image', 'a', 'rbd2/b')[0]   # the positional is the destination
    assert (cmd['source_image_spec'], cmd['dest_image_spec']) == ('rbd/a', 'rbd2/b')


@pytest.mark.parametrize('argv, line', [
    (['execute'], 'rbd: image name was not specified'),
    (['prepare'], 'rbd: image name was not specified'),
    (['execute', 'rbd/vm@s'], "rbd: snapshot name specified for a command that doesn't use it"),
    (['prepare', 'rbd/vm@s', 'rbd2/vm'],
     "rbd: snapshot name specified for a command that doesn't use it"),
    (['prepare', 'rbd/vm', 'rbd2/vm@s'],
     "rbd: snapshot name specified for a command that doesn't use it"),
    (['prepare', 'rbd/vm', 'a/b/c/d'], "rbd: invalid spec 'a/b/c/d'"),
    (['execute', '@s'], "rbd: invalid spec '@s'"),
    (['prepare', '--snap', 's', 'rbd/vm', 'rbd2/vm'],
     'rbd-migration: --snap: names a snapshot only with --import-only (rbd would ignore '
     'it here)'),
])
def test_specs_refused_as_rbd_refuses_them(argv: List[str], line: str) -> None:
    e = refused(*argv)
    assert (e.line, e.status) == (line, errno.EINVAL)


def test_commit_force_and_the_clients_own_options() -> None:
    p = plan(parse(['commit', '--force', '--no-progress', '--no-wait', 'rbd2/vm']), no_file)
    assert p.command('rbd')[0] == {'prefix': 'rbd migration commit', 'format': 'json',
                                   'image_spec': 'rbd2/vm', 'force': True}
    assert (p.wait, p.progress) == (False, False)


# -- imports ----------------------------------------------------------------------

def test_import_from_a_snapshot_builds_a_native_source_spec_client_side() -> None:
    cmd, inbuf = command('prepare', '--import-only', 'rbd/ns/golden@v3', 'rbd2/vm')
    assert cmd == {'prefix': 'rbd migration prepare', 'format': 'json',
                   'import_only': True, 'dest_image_spec': 'rbd2/vm'}
    assert json.loads(inbuf) == {'type': 'native', 'pool_name': 'rbd',
                                 'pool_namespace': 'ns', 'image_name': 'golden',
                                 'snap_name': 'v3'}
    cmd, inbuf = command('prepare', '--import-only', '--snap', 'v3', 'golden', 'vm',
                         default_pool='p')
    assert cmd['dest_image_spec'] == 'p/vm'
    assert json.loads(inbuf)['pool_name'] == 'p'


@pytest.mark.parametrize('argv, line', [
    (['prepare', '--import-only', 'rbd/golden', 'rbd2/vm'], 'rbd: snapshot name was not specified'),
    (['prepare', '--import-only', 'rbd/golden@v3'],
     'rbd: destination image name must be provided'),
    (['prepare', '--source-spec', '{}', 'rbd2/vm'],
     'rbd: --import-only must be used in combination with source-spec/source-spec-path'),
    (['prepare', '--import-only', '--source-spec', '{}', '--source-spec-path', 'f', 'vm'],
     'rbd: cannot specify both source-spec and source-spec-path'),
    (['prepare', '--import-only', '--source-spec', '{}', 'vm@s'],
     "rbd: snapshot name specified for a command that doesn't use it"),
])
def test_import_refusals_read_as_rbds(argv: List[str], line: str) -> None:
    assert refused(*argv).line == line


def test_an_import_source_spec_goes_as_input_and_the_first_spec_is_the_target() -> None:
    read: List[str] = []

    def reader(path: str) -> bytes:
        read.append(path)
        return b'{"type": "raw"}'

    p = plan(parse(['prepare', '--import-only', '--source-spec-path', '-', 'rbd2/vm']), reader)
    assert read == ['-']
    assert p.command('rbd') == ({'prefix': 'rbd migration prepare', 'format': 'json',
                                 'import_only': True, 'dest_image_spec': 'rbd2/vm'},
                                b'{"type": "raw"}')
    assert p.warnings == []
    # rbd creates the image the *first* spec names and ignores a second one.
    p = plan(parse(['prepare', '--import-only', '--source-spec', '{"x": 1}', 'rbd2/vm',
                    'rbd/other']), no_file)
    assert p.command('rbd')[0]['dest_image_spec'] == 'rbd2/vm'
    assert p.warnings == ["rbd-migration: warning: with a source-spec the first image spec "
                          "names the target (as rbd has it); 'rbd/other' not used"]


def test_a_spec_file_that_cannot_be_read_fails_as_in_rbd() -> None:
    def missing(path: str) -> bytes:
        raise FileNotFoundError(errno.ENOENT, 'No such file', path)

    e = refused('prepare', '--import-only', '--source-spec-path', '/x.json', 'vm', read=missing)
    assert (e.line, e.status) == ('rbd: error opening /x.json', errno.ENOENT)


# -- layout options -------------------------------------------------------------

def layout(*options: str) -> Dict[str, Any]:
    cmd = command('prepare', *options, 'rbd/a', 'rbd2/a')[0]
    return {k: v for k, v in cmd.items()
            if k not in ('prefix', 'format', 'source_image_spec', 'dest_image_spec')}


def test_layout_options_become_the_modules() -> None:
    assert layout('--object-size', '8M', '--image-feature', 'layering,exclusive-lock',
                  '--image-feature', 'layering', '--stripe-unit', '64K', '--stripe-count', '8',
                  '--data-pool', 'ecdata', '--flatten', '--image-format', '2',
                  '--new-format') == {
        'object_size': str(8 << 20), 'features': 'layering,exclusive-lock',
        'stripe_unit': str(64 << 10), 'stripe_count': 8, 'data_pool': 'ecdata',
        'flatten': True}


def test_object_sizes_round_to_an_order_and_order_wins_as_in_rbd() -> None:
    assert layout('--object-size', '5M') == {'object_size': str(4 << 20)}
    assert layout('--object-size', '7M') == {'object_size': str(8 << 20)}
    assert layout('--order', '23', '--object-size', '4M') == {'order': 23}
    p = plan(parse(['prepare', '--order', '23', 'a']), no_file)
    assert p.warnings == ['rbd: --order is deprecated, use --object-size']


def test_image_shared_drops_the_single_client_features() -> None:
    assert layout('--image-shared', '--image-feature',
                  'layering,exclusive-lock,object-map,fast-diff,deep-flatten') == {
        'features': 'layering,deep-flatten'}


@pytest.mark.parametrize('options, start', [
    (['--image-shared'], 'rbd-migration: --image-shared: needs --image-feature'),
    (['--mirror-image-mode', 'snapshot'], 'rbd-migration: --mirror-image-mode: '),
    (['--journal-pool', 'p'], 'rbd-migration: --journal-pool: '),
    (['--journal-splay-width', '4'], 'rbd-migration: --journal-splay-width: '),
    (['--journal-object-size', '1M'], 'rbd-migration: --journal-object-size: '),
    (['--image-format', '1'], 'rbd-migration: --image-format 1: '),
])
def test_options_the_module_cannot_honour_are_refused_in_one_line(
        options: List[str], start: str) -> None:
    e = refused('prepare', *options, 'rbd/a', 'rbd2/a')
    assert e.line.startswith(start) and '\n' not in e.line and e.status == errno.EINVAL


# -- talking to the module --------------------------------------------------------

class FakeModule:
    """Answers commands from a script of replies, one list per prefix."""

    def __init__(self, **script: List[Reply]) -> None:
        self.script = {k.replace('_', ' '): v for k, v in script.items()}
        self.sent: List[Tuple[Dict[str, Any], bytes]] = []

    def command(self, cmd: Mapping[str, Any], inbuf: bytes) -> Reply:
        self.sent.append((dict(cmd), inbuf))
        verb = cmd['prefix'].replace('rbd migration ', '')
        return self.script[verb].pop(0)


def task(state: str = 'running', progress: float = 0.0, id: str = '7') -> Reply:
    return Reply(0, json.dumps({'message': 'queued', 'task': {
        'id': id, 'state': state, 'progress': progress}}), '')


def still(pc: int) -> Reply:
    return Reply(errno.EAGAIN, '', f'task 7 (execute of rbd2/vm) is running ({pc}%)')


def done() -> Reply:
    return Reply(0, json.dumps({'message': 'task 7 completed', 'task': {'id': '7'}}), '')


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: List[float] = []
        super().__init__(sleep=self._sleep, now=lambda: self.t)

    def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def test_polling_starts_at_20ms_and_doubles_to_a_second() -> None:
    b = Backoff()
    assert [b() for _ in range(9)] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0]


def test_a_command_answered_einprogress_is_repeated_as_it_was() -> None:
    busy = Reply(errno.EINPROGRESS, '', 'prepare rbd2/vm is still running')
    module = FakeModule(prepare=[busy, busy, Reply(0, '{}', '')])
    clock = FakeClock()
    cmd = {'prefix': 'rbd migration prepare', 'import_only': True}
    assert ask(module, cmd, b'spec', clock).status == 0
    assert module.sent == [(cmd, b'spec')] * 3
    assert clock.slept == [0.02, 0.04]


def test_waiting_reports_progress_until_the_task_ends() -> None:
    module = FakeModule(task_get=[still(10), still(10), still(55), done()])
    seen: List[float] = []
    assert wait_task(module, '7', seen.append, FakeClock()).status == 0
    assert seen == [0.10, 0.10, 0.55]
    assert module.sent[0][0] == {'prefix': 'rbd migration task get', 'task_id': '7',
                                 'format': 'json'}


def test_waiting_rides_out_a_module_restart() -> None:
    away = Reply(errno.EINVAL, '', "No handler found for 'rbd migration task get'")
    module = FakeModule(task_get=[still(10), away, away, done()])
    assert wait_task(module, '7', lambda f: None, FakeClock()).status == 0


def test_progress_messages() -> None:
    assert task_progress('task 7 (execute of rbd2/vm) is running (42%)') == 0.42
    assert task_progress('task 7 (execute of rbd2/vm) is waiting to retry (3%), next '
                         'attempt in 5 s') == 0.03
    assert task_progress('the rbd_migration module is starting; try again') is None


def run_plan(argv: List[str], module: FakeModule) -> Tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    status = run(plan(parse(argv), no_file), module, 'rbd', FakeClock(), err, out)
    return status, out.getvalue(), err.getvalue()


def test_execute_blocks_with_rbds_progress_line() -> None:
    module = FakeModule(execute=[task()], task_get=[still(30), still(30), still(80), done()])
    assert run_plan(['execute', 'rbd2/vm'], module) == (
        0, '', '\rImage migration: 30% complete...\rImage migration: 80% complete...'
               '\rImage migration: 100% complete...done.\n')


def test_commit_and_abort_use_their_own_labels_and_no_progress_hides_them() -> None:
    module = FakeModule(commit=[task()], task_get=[done()])
    assert run_plan(['commit', 'vm'], module)[2] == '\rCommit image migration: 100% ' \
                                                    'complete...done.\n'
    module = FakeModule(abort=[task()], task_get=[still(50), done()])
    assert run_plan(['abort', '--no-progress', 'vm'], module) == (0, '', '')


def test_a_failed_task_exits_with_its_errno_in_rbds_words_and_ours() -> None:
    failed = Reply(errno.EIO, '', 'task 7 (execute of rbd2/vm) failed: source read error')
    module = FakeModule(execute=[task()], task_get=[still(40), failed])
    assert run_plan(['execute', 'vm'], module) == (errno.EIO, '', (
        '\rImage migration: 40% complete...'
        '\rImage migration: 40% complete...failed.\n'
        'rbd-migration: task 7 (execute of rbd2/vm) failed: source read error\n'
        'rbd: migration failed: (5) Input/output error\n'))


def test_a_cancelled_task_exits_125() -> None:
    module = FakeModule(abort=[task()], task_get=[
        Reply(errno.ECANCELED, '', 'task 7 (abort of rbd2/vm) was cancelled')])
    status, _, err = run_plan(['abort', '--no-progress', 'vm'], module)
    assert status == errno.ECANCELED
    assert err.endswith('rbd: aborting migration failed: (125) Operation canceled\n')


def test_a_refused_command_fails_as_rbd_fails() -> None:
    module = FakeModule(commit=[Reply(errno.EINVAL, '', "image 'rbd/vm' is not being "
                                                        'migrated; prepare a migration first')])
    assert run_plan(['commit', 'vm'], module) == (errno.EINVAL, '', (
        '\rCommit image migration: 0% complete...failed.\n'
        "rbd-migration: image 'rbd/vm' is not being migrated; prepare a migration first\n"
        'rbd: committing migration failed: (22) Invalid argument\n'))


def test_executing_an_executed_migration_fails_einval_as_in_rbd() -> None:
    module = FakeModule(execute=[Reply(0, json.dumps({
        'message': 'the migration of rbd2/vm is already executed; commit it', 'task': None}),
        '')])
    status, _, err = run_plan(['execute', '--no-progress', 'vm'], module)
    assert status == errno.EINVAL
    assert 'already executed' in err and err.endswith('(22) Invalid argument\n')


def test_no_wait_prints_the_task_id_at_once() -> None:
    module = FakeModule(execute=[task(id='12')])
    assert run_plan(['execute', '--no-wait', 'vm'], module) == (0, '12\n', '')


def test_prepare_answers_when_the_module_does() -> None:
    module = FakeModule(prepare=[Reply(errno.EINPROGRESS, '', 'still running'),
                                 Reply(errno.EEXIST, '', "target image 'rbd2/vm' already "
                                                         'exists')])
    assert run_plan(['prepare', '--import-only', '--source-spec', '{}', 'rbd2/vm'],
                    module) == (errno.EEXIST, '', (
                        "rbd-migration: target image 'rbd2/vm' already exists\n"
                        'rbd: preparing import migration failed: (17) File exists\n'))
    module = FakeModule(prepare=[Reply(0, '{}', '')])
    assert run_plan(['prepare', 'rbd/vm', 'rbd2/vm'], module) == (0, '', '')


def test_the_progress_line_is_rbds() -> None:
    out = io.StringIO()
    p = Progress('Image migration', True, out)
    for f in (0.0, 0.061, 0.069, 0.5, 1.0):
        p.update(f)
    p.finish()
    assert out.getvalue() == ('\rImage migration: 6% complete...\rImage migration: 50% '
                              'complete...\rImage migration: 100% complete...'
                              '\rImage migration: 100% complete...done.\n')


def test_plans_are_plain_data() -> None:
    p: Optional[Plan] = plan(parse(['abort', 'vm']), no_file)
    assert p is not None and p.action == 'abort' and p.specs['image_spec'].image == 'vm'


def test_a_module_that_is_off_fails_at_once_and_a_timeout_is_a_failure() -> None:
    off = Reply(errno.EOPNOTSUPP, '', "Module 'rbd_migration' is not enabled/loaded "
                                      "(required by command 'rbd migration execute')")
    module = FakeModule(execute=[off])
    assert run_plan(['execute', '--no-progress', 'vm'], module)[0] == errno.EOPNOTSUPP
    probe = Reply(errno.ETIMEDOUT, '', 'the probe of raw over http took too long')
    module = FakeModule(prepare=[probe])
    assert run_plan(['prepare', 'rbd/vm', 'rbd2/vm'], module)[0] == errno.ETIMEDOUT
    # While a task is waited on, "not loaded" is the module restarting.
    module = FakeModule(task_get=[off, done()])
    assert wait_task(module, '7', lambda f: None, FakeClock()).status == 0


def test_waiting_on_a_module_gone_for_good_gives_up() -> None:
    away = Reply(errno.EINVAL, '', "No handler found for 'rbd migration task get'")
    module = FakeModule(task_get=[away] * 200)
    clock = FakeClock()
    assert wait_task(module, '7', lambda f: None, clock).status == errno.EINVAL
    assert 120 < clock.t < 125

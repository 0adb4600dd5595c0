"""rbd-migration is a drop-in for ``rbd migration``: a scenario written for
the rbd CLI (prepare, writes to the live target, execute, commit, every
snapshot compared with ``rbd export | sha256sum``) ends the same when run
with ``tools/rbd-migration`` instead: the same images, snapshots and exit
statuses.  Each scenario runs twice, once per client, on images of its own.

Sizes are multiples of 4 MiB: librbd 16.2 fails some imports of other sizes
itself (raw with snapshots: ERANGE), which is not what is compared here.
"""
import hashlib
import json
import os
import random
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import rados
import rbd

from qa.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
DROPIN = str(REPO / 'tools' / 'rbd-migration')
MiB = 1 << 20
SIZE = 16 * MiB
#: What `rbd bench` writes to a live target while prepared (constant bytes
#: at 0..2 MiB: rbd bench fills its buffer from an unseeded rand()).
BENCH = ['bench', '--io-type', 'write', '--io-pattern', 'seq', '--io-size', '64K',
         '--io-total', '2M', '--io-threads', '1']
CLIENTS = ('rbd', 'dropin')


def client_argv(cluster: Cluster, client: str) -> List[str]:
    """``rbd migration`` or the drop-in, with the test cluster's conf."""
    assert cluster.state
    if client == 'rbd':
        return ['rbd', '--conf', cluster.state.conf, 'migration']
    return [DROPIN, '--conf', cluster.state.conf]


def run(argv: Sequence[str], stdin: Optional[bytes] = None,
        timeout: float = 300) -> 'subprocess.CompletedProcess[str]':
    return subprocess.run(list(argv), input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=timeout)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def export(cluster: Cluster, spec: str) -> bytes:
    assert cluster.state
    return subprocess.run(['rbd', '--conf', cluster.state.conf, 'export', '--no-progress',
                           spec, '-'], capture_output=True, check=True).stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Scenario:
    """What to prepare and what the target must hold."""

    #: ``rbd migration prepare`` arguments.
    prepare: List[str]
    target: str
    #: sha256 of each snapshot ('' is HEAD) as the source holds it.
    expected: Dict[str, str]
    stdin: Optional[bytes] = None
    #: sha256 of the source's HEAD past the first 2 MiB, where `rbd bench`
    #: writes to the target while prepared; None: no writes while prepared.
    untouched: Optional[str] = None
    #: An in-cluster source, gone once committed.
    source: Optional[str] = None


@dataclass
class Outcome:
    """What a client made of a scenario: compared between the two."""

    codes: Dict[str, int] = field(default_factory=dict)
    snapshots: List[Tuple[str, int]] = field(default_factory=list)
    shas: Dict[str, str] = field(default_factory=dict)
    progress_done: bool = False
    source_left: Optional[bool] = None
    #: sha256 of the target's HEAD within the first 2 MiB, and past them.
    head_written: str = ''
    head_untouched: str = ''


def migrate(cluster: Cluster, client: str, s: Scenario) -> Outcome:
    assert cluster.state
    rbd_cli = ['rbd', '--conf', cluster.state.conf]
    argv = client_argv(cluster, client)
    out = Outcome()
    r = run([*argv, 'prepare', *s.prepare], s.stdin)
    out.codes['prepare'] = r.returncode
    assert r.returncode == 0, f'{client} prepare: {r.stderr}'
    if s.untouched is not None:
        out.codes['live writes'] = run([*rbd_cli, *BENCH, s.target]).returncode
    r = run([*argv, 'execute', s.target])
    out.codes['execute'] = r.returncode
    out.progress_done = r.stderr.rstrip().endswith(
        'Image migration: 100% complete...done.')
    out.codes['execute again'] = run([*argv, 'execute', '--no-progress', s.target]).returncode
    r = run([*argv, 'commit', s.target])
    out.codes['commit'] = r.returncode
    assert r.returncode == 0, f'{client} commit: {r.stderr}'
    snaps = json.loads(run([*rbd_cli, 'snap', 'ls', '--format', 'json', s.target]).stdout)
    out.snapshots = [(snap['name'], snap['size']) for snap in snaps]
    out.shas = {name: sha(export(cluster, f'{s.target}@{name}')) for name, _ in out.snapshots}
    head = export(cluster, s.target)
    out.shas[''] = sha(head)
    out.head_written, out.head_untouched = sha(head[:2 * MiB]), sha(head[2 * MiB:])
    if s.source:
        pool, name = s.source.split('/', 1)
        out.source_left = name in run([*rbd_cli, 'ls', pool]).stdout.split()
    return out


def remove(cluster: Cluster, *images: str) -> None:
    assert cluster.state
    for image in images:
        run(['rbd', '--conf', cluster.state.conf, 'snap', 'purge', '--no-progress', image])
        run(['rbd', '--conf', cluster.state.conf, 'rm', '--no-progress', image])


def both(cluster: Cluster, make: Callable[[str], Scenario]) -> Outcome:
    """The scenario with each client, on images of each client's own; both
    end the same, and as the source says.  The rbd CLI's outcome."""
    outcomes = {}
    for client in CLIENTS:
        scenario = make(f'{client}-{uuid.uuid4().hex[:6]}')
        try:
            outcomes[client] = migrate(cluster, client, scenario)
        finally:
            remove(cluster, scenario.target)
        check(outcomes[client], scenario)
    assert outcomes['dropin'] == outcomes['rbd']
    return outcomes['rbd']


def check(out: Outcome, s: Scenario) -> None:
    live = s.untouched is not None
    assert out.codes == dict({'prepare': 0, 'execute': 0, 'execute again': 22, 'commit': 0},
                             **({'live writes': 0} if live else {}))
    assert out.progress_done
    assert {k: v for k, v in out.shas.items() if k} == {k: v for k, v in s.expected.items() if k}
    if live:
        assert out.head_untouched == s.untouched
        assert out.head_written == sha(b'\x67' * 2 * MiB)
    else:
        assert out.shas[''] == s.expected['']


# -- the sources -----------------------------------------------------------------

def write_native_source(cluster: Cluster, pool: str, name: str) -> None:
    """An image with two snapshots, each differing from the last."""
    assert cluster.state
    with rados.Rados(conffile=cluster.state.conf) as c, c.open_ioctx(pool) as io:
        rbd.RBD().create(io, name, SIZE)
        with rbd.Image(io, name) as img:
            img.write(pattern(1, SIZE), 0)
            img.create_snap('s1')
            img.write(pattern(2, 4 * MiB), 4 * MiB)
            img.create_snap('s2')
            img.write(pattern(3, MiB), 10 * MiB)


def raw_files(directory: Path, tag: str) -> Dict[str, Path]:
    """HEAD and two older raw images, to import as snapshots s1, s2."""
    files = {}
    for seed, name in enumerate(('s1', 's2', 'head')):
        path = directory / f'{tag}-{name}.raw'
        path.write_bytes(pattern(10 + seed, SIZE))
        files[name] = path
    return files


def raw_spec(streams: Dict[str, Dict[str, str]]) -> bytes:
    return json.dumps({'type': 'raw', 'stream': streams['head'], 'snapshots': [
        {'type': 'raw', 'name': name, 'stream': streams[name]} for name in ('s1', 's2')]
    }).encode()


def expected_of(files: Dict[str, Path]) -> Dict[str, str]:
    return {('' if name == 'head' else name): sha(p.read_bytes()) for name, p in files.items()}


def spec_file(directory: Path, tag: str, spec: bytes) -> str:
    path = directory / f'{tag}.json'
    path.write_bytes(spec)
    return str(path)


def qemu(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


# -- the scenarios ------------------------------------------------------------------

def test_native_migration_with_snapshots_and_live_writes(cluster: Cluster) -> None:
    def make(tag: str) -> Scenario:
        source = f'rbd/{tag}-nat'
        write_native_source(cluster, 'rbd', f'{tag}-nat')
        expected = {snap: sha(export(cluster, f'{source}@{snap}')) for snap in ('s1', 's2')}
        head = export(cluster, source)
        return Scenario([source, f'rbd2/{tag}-nat'], f'rbd2/{tag}-nat',
                        dict(expected, **{'': sha(head)}), untouched=sha(head[2 * MiB:]),
                        source=source)
    real = both(cluster, make)
    assert real.source_left is False
    assert real.snapshots == [('s1', SIZE), ('s2', SIZE)]


def test_import_only_from_a_snapshot_shorthand(cluster: Cluster) -> None:
    """``prepare --import-only POOL/IMAGE@SNAP DEST``: rbd writes the native
    source-spec itself; the drop-in too (by pool name).  The target gets the
    snapshots up to that one and, as librbd 16.2 imports it, the source's
    HEAD (not the snapshot's data) as its HEAD."""
    golden = f'rbd/gold-{uuid.uuid4().hex[:6]}'
    write_native_source(cluster, 'rbd', golden.split('/')[1])
    expected = {snap: sha(export(cluster, f'{golden}@{snap}')) for snap in ('s1', 's2')}
    head = export(cluster, golden)

    def make(tag: str) -> Scenario:
        return Scenario(['--import-only', f'{golden}@s2', f'rbd2/{tag}-imp'],
                        f'rbd2/{tag}-imp', dict(expected, **{'': sha(head)}),
                        untouched=sha(head[2 * MiB:]))
    try:
        real = both(cluster, make)
    finally:
        remove(cluster, golden)
    assert real.snapshots == [('s1', SIZE), ('s2', SIZE)]


def test_import_of_raw_files_with_snapshots(cluster: Cluster, roots: Path) -> None:
    """A file import is not live with the module (its adapter engine keeps
    the target out of sight until commit): no writes while prepared here."""
    def make(tag: str) -> Scenario:
        files = raw_files(roots, tag)
        spec = raw_spec({k: {'type': 'file', 'file_path': str(p)} for k, p in files.items()})
        return Scenario(['--import-only', '--source-spec-path', spec_file(roots, tag, spec),
                         f'rbd2/{tag}-raw'], f'rbd2/{tag}-raw', expected_of(files))
    assert both(cluster, make).snapshots == [('s1', SIZE), ('s2', SIZE)]


def test_import_of_raw_over_http_with_snapshots_and_live_writes(cluster: Cluster) -> None:
    """Over HTTP the module imports through librbd, live, as rbd does."""
    assert cluster.state and cluster.state.http_root and cluster.state.http_port
    root, port = Path(cluster.state.http_root), cluster.state.http_port

    def make(tag: str) -> Scenario:
        files = raw_files(root, tag)
        spec = raw_spec({k: {'type': 'http', 'url': f'http://127.0.0.1:{port}/{p.name}'}
                         for k, p in files.items()})
        return Scenario(['--import-only', '--source-spec', spec.decode(), f'rbd2/{tag}-http'],
                        f'rbd2/{tag}-http', expected_of(files),
                        untouched=sha(files['head'].read_bytes()[2 * MiB:]))
    assert both(cluster, make).snapshots == [('s1', SIZE), ('s2', SIZE)]


def test_import_of_a_qcow_v1_file(cluster: Cluster, roots: Path) -> None:
    def make(tag: str) -> Scenario:
        base = roots / f'{tag}.raw'
        base.write_bytes(pattern(20, SIZE))
        image = roots / f'{tag}.qcow'
        qemu('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow', str(base), str(image))
        spec = json.dumps({'type': 'qcow', 'stream': {'type': 'file',
                                                       'file_path': str(image)}}).encode()
        return Scenario(['--import-only', '--source-spec-path', spec_file(roots, tag, spec),
                         f'rbd2/{tag}-qcow'], f'rbd2/{tag}-qcow', {'': sha(base.read_bytes())})
    assert both(cluster, make).snapshots == []


def test_import_of_a_qcow2_file_with_internal_snapshots(cluster: Cluster, roots: Path) -> None:
    """Made with qemu-img convert, snapshots with qemu-img snapshot, written
    between them with qemu-io; the source-spec comes on stdin (``-``)."""
    def make(tag: str) -> Scenario:
        base = roots / f'{tag}.raw'
        base.write_bytes(pattern(30, SIZE))
        image = str(roots / f'{tag}.qcow2')
        qemu('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', str(base), image)
        qemu('qemu-img', 'snapshot', '-c', 's1', image)
        qemu('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 4M 4M', image)
        qemu('qemu-img', 'snapshot', '-c', 's2', image)
        qemu('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 10M 1M', image)
        expected = {}
        for snap in ('s1', 's2', ''):
            ref = roots / f'{tag}-{snap or "head"}.ref'
            by_snap = ['-l', f'snapshot.name={snap}'] if snap else []
            qemu('qemu-img', 'convert', '-f', 'qcow2', *by_snap, '-O', 'raw', image, str(ref))
            expected[snap] = sha(ref.read_bytes())
        spec = json.dumps({'type': 'qcow', 'stream': {'type': 'file', 'file_path': image}})
        return Scenario(['--import-only', '--source-spec-path', '-', f'rbd2/{tag}-qcow2'],
                        f'rbd2/{tag}-qcow2', expected, stdin=spec.encode())
    assert both(cluster, make).snapshots == [('s1', SIZE), ('s2', SIZE)]


# -- refusals and timings -----------------------------------------------------------

def test_refusals_exit_with_the_same_status(cluster: Cluster) -> None:
    assert cluster.state
    tag = uuid.uuid4().hex[:6]
    plain, taken = f'rbd/plain-{tag}', f'rbd2/taken-{tag}'
    for spec in (plain, taken):
        run(['rbd', '--conf', cluster.state.conf, 'create', '--size', '4M', spec])
    cases = {
        'execute of a missing image': ['execute', f'rbd/missing-{tag}'],
        'prepare of a missing image': ['prepare', f'rbd/missing-{tag}', f'rbd2/m-{tag}'],
        'commit of an image not migrating': ['commit', plain],
        'abort of an image not migrating': ['abort', plain],
        'execute of an image not migrating': ['execute', plain],
        'prepare onto an existing image': ['prepare', plain, taken],
        'a snapshot where none is taken': ['execute', f'{plain}@s'],
        'import-only without a snapshot': ['prepare', '--import-only', plain, f'rbd2/i-{tag}'],
        'no image': ['commit'],
        'an unknown option': ['execute', '--no-prog', plain],
        'a bad object size': ['prepare', '--object-size', '4m', plain, f'rbd2/o-{tag}'],
        'too many arguments': ['abort', plain, taken],
    }
    codes: Dict[str, Dict[str, int]] = {c: {} for c in CLIENTS}
    last: Dict[str, Dict[str, str]] = {c: {} for c in CLIENTS}
    try:
        for client in CLIENTS:
            for what, args in cases.items():
                r = run([*client_argv(cluster, client), *args])
                codes[client][what] = r.returncode
                lines = r.stderr.strip().splitlines()
                last[client][what] = lines[-1].rsplit(': ', 1)[-1] if lines else ''
    finally:
        remove(cluster, plain, taken)
    assert codes['dropin'] == codes['rbd']
    assert set(codes['rbd'].values()) == {1, 2, 17, 22}
    # Where the module answered, the errno's words are rbd's.
    for what, code in codes['rbd'].items():
        if code not in (0, 1):
            assert last['dropin'][what] == last['rbd'][what], what


def timed(argv: Sequence[str]) -> Tuple[float, int]:
    began = time.monotonic()
    r = run(argv)
    return time.monotonic() - began, r.returncode


def test_a_short_commit_answers_as_rbd_does(cluster: Cluster) -> None:
    """The drop-in polls from 20 ms up, so a commit the module does in a
    tenth of a second answers in a few tenths, Python's start included.
    Both clients' times are printed; how fast is for qa/bench
    (command_latency.py), not for an assertion a loaded machine breaks."""
    assert cluster.state
    rbd_cli = ['rbd', '--conf', cluster.state.conf]
    seconds: Dict[str, float] = {}
    for client in CLIENTS:
        name = f'{client}-{uuid.uuid4().hex[:6]}'
        run([*rbd_cli, 'create', '--size', '8M', f'rbd/{name}'])
        argv = client_argv(cluster, client)
        assert run([*argv, 'prepare', f'rbd/{name}', f'rbd2/{name}']).returncode == 0
        assert run([*argv, 'execute', '--no-progress', f'rbd2/{name}']).returncode == 0
        seconds[client], code = timed([*argv, 'commit', '--no-progress', f'rbd2/{name}'])
        remove(cluster, f'rbd2/{name}')
        assert code == 0
    print(f"\ncommit of an 8 MiB image: rbd migration commit {seconds['rbd']:.3f} s, "
          f"rbd-migration commit {seconds['dropin']:.3f} s")


def test_no_wait_returns_a_task_to_wait_on(cluster: Cluster) -> None:
    assert cluster.state
    name = f'nowait-{uuid.uuid4().hex[:6]}'
    run(['rbd', '--conf', cluster.state.conf, 'create', '--size', '8M', f'rbd/{name}'])
    argv = client_argv(cluster, 'dropin')
    try:
        assert run([*argv, 'prepare', f'rbd/{name}', f'rbd2/{name}']).returncode == 0
        r = run([*argv, 'execute', '--no-wait', f'rbd2/{name}'])
        assert r.returncode == 0 and r.stderr == ''
        task = r.stdout.strip()
        assert cluster.task_end(task).returncode == 0
        assert run([*argv, 'commit', f'rbd2/{name}']).returncode == 0
    finally:
        remove(cluster, f'rbd2/{name}')
    assert os.path.exists(DROPIN)


def test_progress_moves_while_an_execute_runs(cluster: Cluster) -> None:
    """The percentage comes from the module's ``task get`` answers: a copy
    of a few seconds shows some between 0 and 100, as rbd's does."""
    assert cluster.state
    rbd_cli = ['rbd', '--conf', cluster.state.conf]
    name = f'progress-{uuid.uuid4().hex[:6]}'
    run([*rbd_cli, 'create', '--size', '320M', f'rbd/{name}'])
    run([*rbd_cli, 'bench', '--io-type', 'write', '--io-size', '4M', '--io-total', '320M',
         f'rbd/{name}'])
    argv = client_argv(cluster, 'dropin')
    try:
        assert run([*argv, 'prepare', f'rbd/{name}', f'rbd2/{name}']).returncode == 0
        r = run([*argv, 'execute', f'rbd2/{name}'])
        assert r.returncode == 0
        assert run([*argv, 'commit', '--no-progress', f'rbd2/{name}']).returncode == 0
    finally:
        remove(cluster, f'rbd2/{name}', f'rbd/{name}')
    steps = r.stderr.split('\n')    # text mode reads rbd's '\r' as '\n'
    assert steps[0] == '' and steps[-2:] == ['Image migration: 100% complete...done.', '']
    percents = [int(step.split(': ')[1].split('%')[0]) for step in steps[1:-2]]
    assert percents and all(0 < pc <= 100 for pc in percents), steps
    assert percents == sorted(set(percents)), steps

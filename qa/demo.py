#!/usr/bin/python3
"""The README's demo: a live migration of an image with snapshots from pool
``rbd`` to pool ``rbd2``, checked byte for byte, on the cluster in DIR."""
import hashlib
import subprocess
import sys

from cluster import Cluster


def sh(*argv: str) -> str:
    print('$', ' '.join(argv), flush=True)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    if out.strip():
        print(out.rstrip(), flush=True)
    return out


def checksum(conf: str, spec: str) -> str:
    data = subprocess.run(['rbd', '--conf', conf, 'export', spec, '-'],
                          check=True, capture_output=True).stdout
    return hashlib.sha256(data).hexdigest()


def main() -> int:
    c = Cluster(sys.argv[1])
    assert c.state
    conf = c.state.conf
    rbd = ['rbd', '--conf', conf]
    sh(*rbd, 'create', '--size', '256M', 'rbd/demo')
    sh(*rbd, 'bench', '--io-type', 'write', '--io-size', '4M',
       '--io-total', '64M', '--io-pattern', 'rand', 'rbd/demo')
    sh(*rbd, 'snap', 'create', 'rbd/demo@before')
    before = checksum(conf, 'rbd/demo@before'), checksum(conf, 'rbd/demo')
    sh(*rbd, 'migration', 'prepare', 'rbd/demo', 'rbd2/demo')
    sh(*rbd, 'status', 'rbd2/demo')
    sh(*rbd, 'migration', 'execute', 'rbd2/demo')
    sh(*rbd, 'migration', 'commit', 'rbd2/demo')
    after = checksum(conf, 'rbd2/demo@before'), checksum(conf, 'rbd2/demo')
    assert before == after, 'data differs after migration'
    print(f'\nrbd/demo moved to rbd2/demo; HEAD and snapshot identical '
          f'(sha256 {after[1][:16]}…)')
    print(f'\nUse the cluster:  eval "$(/usr/bin/python3 qa/cluster.py env --dir {c.dir})"'
          f'\nStop it:          /usr/bin/python3 qa/cluster.py stop --dir {c.dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

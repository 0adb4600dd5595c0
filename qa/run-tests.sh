#!/bin/bash
# Run the whole test suite on a Debian 12 machine (as root): installs what is
# missing, then runs tox (unit tests, cluster tests on a real one-node Ceph
# cluster that the tests start and stop, and mypy).  Extra arguments go to
# pytest, e.g. qa/run-tests.sh -k lifecycle.
set -euo pipefail
cd "$(dirname "$0")/.."
/usr/bin/python3 qa/cluster.py install --tests

# Clusters the tests start live under this directory; whatever happens to
# pytest, stop them on the way out (only those, by their directory).
base=$(mktemp -d /tmp/rbd-migration-tests.XXXXXX)
# A daemon the kernel kills for want of memory leaves no trace in pytest's
# output (its tests fail or wait): say so at the end.
ooms() { dmesg 2>/dev/null | grep -c 'Out of memory: Killed process' || true; }
ooms_before=$(ooms)
cleanup() {
    find "$base" -name cluster.json -printf '%h\n' 2>/dev/null | while read -r d; do
        /usr/bin/python3 qa/cluster.py stop --dir "$d" || true
    done
    rm -rf "$base"
    if [ "$(ooms)" != "$ooms_before" ]; then
        echo "the kernel killed processes for want of memory during the tests:"
        { dmesg | grep 'Out of memory: Killed process' | tail -n "+$((ooms_before + 1))"; } || true
    fi
}
trap cleanup EXIT

tox -e py3 -- --basetemp="$base/pytest" "${@:-tests}"
tox -e mypy

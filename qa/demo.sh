#!/bin/bash
# Demo on a Debian 12 machine (as root): install what is missing, start a
# one-node cluster with rbd_migration loaded, and run a real live migration
# end to end.  The cluster is left running; the last lines say how to use it
# and how to stop it.  Usage: qa/demo.sh [DIR]   (default /tmp/rbd-migration-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/rbd-migration-demo}
/usr/bin/python3 qa/cluster.py install
/usr/bin/python3 qa/cluster.py stop --dir "$dir" >/dev/null 2>&1 || true
eval "$(/usr/bin/python3 qa/cluster.py start --dir "$dir" --http)"
exec /usr/bin/python3 qa/demo.py "$dir"

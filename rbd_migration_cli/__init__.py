"""``rbd-migration``: a drop-in for ``rbd migration prepare|execute|commit|abort``
that runs them through the rbd_migration mgr module.

Scripts written for the rbd CLI expect its commands to block until done,
print its progress line and exit with its errno; the module answers at once
with a task.  This client takes the rbd CLI's arguments (Ceph 16.2), turns
them into module commands, waits for the task and answers as rbd does.

Kept apart from the ``rbd_migration`` package on purpose: that one runs
inside ceph-mgr and must not grow a client's dependencies, nor this client
the mgr's.
"""

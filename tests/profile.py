"""How hard the suite tries: ``RBD_MIGRATION_TEST_PROFILE``.

``quick`` (the default, what CI runs) gives every fault loop and every
generated test enough rounds and examples to cover each path once or
twice, derandomized, so a run takes minutes and fails the same way twice.
``thorough`` (on demand, before a release or after touching a fault path)
runs the loops many times and lets hypothesis pick new examples each run::

    RBD_MIGRATION_TEST_PROFILE=thorough qa/run-tests.sh

``RBD_MIGRATION_TEST_ROUNDS`` still sets the rounds of every fault loop.
"""
import os

PROFILE = os.environ.get('RBD_MIGRATION_TEST_PROFILE', 'quick')
if PROFILE not in ('quick', 'thorough'):
    raise SystemExit(f"RBD_MIGRATION_TEST_PROFILE={PROFILE!r}: use 'quick' or 'thorough'")
THOROUGH = PROFILE == 'thorough'


def rounds(quick: int, thorough: int) -> int:
    """Rounds of a fault loop (a kill, a failover, a fault at a random
    moment) under the current profile."""
    given = os.environ.get('RBD_MIGRATION_TEST_ROUNDS')
    return int(given) if given else (thorough if THOROUGH else quick)


def examples(quick: int, thorough: int) -> int:
    """Examples of a generated test that runs against the cluster."""
    return thorough if THOROUGH else quick

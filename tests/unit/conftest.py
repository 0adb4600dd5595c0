"""Fixtures of the unit tests: task queues driven step by step."""
from typing import Iterator, List

import pytest

from tests.queueharness import Harness, make_harness


@pytest.fixture
def harnesses() -> Iterator[List[Harness]]:
    """Every harness a test makes; its runner calls are released at the end."""
    made: List[Harness] = []
    yield made
    for h in made:
        h.runner.release_all()


@pytest.fixture
def h(harnesses: List[Harness]) -> Harness:
    harness = make_harness()
    harnesses.append(harness)
    return harness

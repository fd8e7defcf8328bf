"""What every test leaves as it found it, so that the suite passes in any order: the project's logger
(the command line installs its Progress handler), torch's default dtype and random state; and one torch
thread a test. Tests marked slow (about ten seconds or more on 2 cores) run first, so that pytest -n 2 ends its two
workers together; -m "not slow" leaves them out."""
import logging
import os

# One thread for torch in each test and in the commands it starts (they inherit it), set before torch loads:
# pytest -n 2 runs two tests side by side on two cores, and two threads each made them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: about ten seconds or more on 2 cores (processes of its own, whole runs)")


def pytest_collection_modifyitems(items):
    """pytest -n 2 --dist worksteal hands each worker half the list, and the worker done first takes tests from
    the end of the other's: half the slow tests go first in each half, so that the tests left to the end are
    short ones and the two workers end together. Slow tests of one file stay side by side (in one worker, a
    fixture of theirs is made once)."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    half = len(slow) // 2
    first = max(0, len(items) // 2 - half)
    items[:] = slow[:half] + fast[:first] + slow[half:] + fast[first:]


@pytest.fixture(autouse=True)
def isolated():
    log = logging.getLogger("merge")
    handlers, level, propagate, dtype = list(log.handlers), log.level, log.propagate, torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    log.handlers, log.propagate = handlers, propagate
    log.setLevel(level)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)

"""What every test leaves as it found it, so that the suite passes in any order: the project's logger
(the command line installs its Progress handler), torch's default dtype and random state, whether torch.compile
failed in this process (stacked.COMPILER); and one torch thread a test. Tests marked slow start first in each
worker's share, so that pytest -n 2 ends its two workers together; -m "not slow" leaves them out."""
import logging
import os

# One thread for torch in each test and in the commands it starts (they inherit it), set before torch loads:
# pytest -n 2 runs two tests side by side on two cores, and two threads each made them wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import stacked  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slowest tests (most start processes or run whole experiments)")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: the list the workers share out
def pytest_collection_modifyitems(config, items):
    """pytest -n N --dist worksteal hands worker w the w-th of N equal slices of the list, and a worker done
    first takes tests from the end of another's: each slice starts with its share of the slow tests, so that
    the tests left to the end are short ones and the workers end together."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    ordered = []
    for w in range(workers):
        mine = slow[len(slow) * w // workers:len(slow) * (w + 1) // workers]
        room = max(0, len(items) * (w + 1) // workers - len(ordered) - len(mine))
        ordered += mine + fast[:room]
        del fast[:room]
    items[:] = ordered + fast


@pytest.fixture(autouse=True)
def isolated():
    log = logging.getLogger("merge")
    handlers, level, propagate, dtype = list(log.handlers), log.level, log.propagate, torch.get_default_dtype()
    rng, compiler = torch.get_rng_state(), dict(stacked.COMPILER)
    yield
    stacked.COMPILER.update(compiler)  # a test whose compiler failed (stood in) does not stop the next compiling
    log.handlers, log.propagate = handlers, propagate
    log.setLevel(level)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)

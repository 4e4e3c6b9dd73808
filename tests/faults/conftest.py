"""Shared by the fault-injection suite (issue 7): a tiny data tree, launchers, signals.

Every test here first shows that its fault really happened (the process died of SIGKILL,
the temp file of a checkpoint write existed, the peer's exit code, the injected error was
raised, the pickle would have run its code), then checks the guarantee.

Test hooks in the product code (inert unless the variable is set; this is the only list):

- ``SGE_TEST_FAULT=slow_write:S`` (``sge/checkpoint.py``, ``write_atomic``): sleep S seconds
  with a checkpoint's temp file written but not yet renamed. It paces a run (with
  ``train.ckpt_every_steps=1`` every step writes) so that signals sent from here land mid-run,
  and it opens a window in which a SIGKILL tears a checkpoint write.

Everything else is injected in-process with ``monkeypatch`` (NaN losses, ENOSPC, inf
gradients) or with real OS mechanisms (signals, ``RLIMIT_FSIZE``).
"""
import pytest

from tests.engine_utils import make_folder


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """3 classes of 36 px JPEGs: 24 train images, 13 val images."""
    return make_folder(tmp_path_factory.mktemp("faults_data"))


@pytest.fixture(scope="session")
def empty_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults_cfg") / "empty.yaml"
    path.write_text("{}\n")
    return path

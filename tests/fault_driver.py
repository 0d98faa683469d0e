"""Run one stage like `python -m stages.<name>`, killed on purpose inside an HDF5 write (test helper).

Usage: python tests/fault_driver.py <stage|all> [stage arguments...]

The features file is written block by block through h5py (pipeline/features_h5.py), not through
atomic.atomic_path, so its PIPELINE_FAULT hook cannot reach it. With FAULT_HDF5_WRITE=<n> this
driver SIGKILLs the process right after the n-th write into a `features` dataset, before the
block's `rows_done` attribute is updated and the file flushed: the most torn state a kill can leave.
FAULT_BLOCK_ROWS=<rows> shrinks the blocks, so that the tiny fake splits take several writes each.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def install_hdf5_kill(occurrence: int) -> None:
    import h5py

    original = h5py.Dataset.__setitem__
    writes = {"count": 0}

    def write_then_maybe_die(dataset, selection, value):
        original(dataset, selection, value)
        if dataset.name.endswith("/features"):
            writes["count"] += 1
            if writes["count"] == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    h5py.Dataset.__setitem__ = write_then_maybe_die


def main() -> int:
    from pipeline import cli

    stage, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("FAULT_HDF5_WRITE"):
        install_hdf5_kill(int(os.environ["FAULT_HDF5_WRITE"]))
    if os.environ.get("FAULT_BLOCK_ROWS"):
        from pipeline import features_h5

        features_h5.CHUNK_ROWS = int(os.environ["FAULT_BLOCK_ROWS"])
    return cli.run_all(argv) if stage == "all" else cli.run_stage(stage, argv)


if __name__ == "__main__":
    sys.exit(main())

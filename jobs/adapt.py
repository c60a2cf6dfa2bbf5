"""`ray job submit` entry point for adaptation: same arguments as `wbc-batch adapt`.

    ray job submit --working-dir . -- python jobs/adapt.py DATA MODEL_OUT --replay PBC_DATA [options]

Inside a submitted job the driver connects to the job's cluster (RAY_ADDRESS
is set by Ray), so ``--ray-address`` is not needed.
"""

from __future__ import annotations

import sys

from wbc_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["adapt", *sys.argv[1:]]))

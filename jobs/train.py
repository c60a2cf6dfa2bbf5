"""`ray job submit` entry point for training: same arguments as `wbc-batch train`.

    ray job submit --working-dir . -- python jobs/train.py DATA MODEL_OUT --workers 4 [options]

Inside a submitted job the driver connects to the job's cluster (RAY_ADDRESS
is set by Ray), so ``--ray-address`` is not needed.
"""

from __future__ import annotations

import sys

from wbc_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""`ray job submit` entry point for classify: same arguments as `wbc-batch classify`.

    ray job submit --working-dir . -- python jobs/classify.py INPUT OUTPUT [options]
"""

from __future__ import annotations

import sys

from wbc_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))

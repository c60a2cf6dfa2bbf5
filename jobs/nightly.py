"""`ray job submit` entry point for nightly: same arguments as `wbc-batch nightly`.

    ray job submit --submission-id nightly-$(date -u +%Y%m%d) --working-dir . -- \
        python jobs/nightly.py INPUT OUTPUT --run-id nightly-$(date -u +%Y%m%d) [options]
"""

from __future__ import annotations

import sys

from wbc_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))

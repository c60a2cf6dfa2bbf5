"""Review and sign-off: verdict records, counts with verdicts, import and export, the review web app.

The web app (:mod:`wbc_batch.review.app`) is not imported here, so the
counts can be used without loading the web framework.
"""

from __future__ import annotations

from wbc_batch.review.counts import agreement_from_frame, attach_verdicts
from wbc_batch.review.records import (
    VERDICT_SCHEMA,
    VerdictStore,
    current_verdicts,
    make_record,
    read_verdicts,
    signoffs,
)

__all__ = [
    "VERDICT_SCHEMA", "VerdictStore", "agreement_from_frame", "attach_verdicts", "current_verdicts", "make_record",
    "read_verdicts", "signoffs",
]

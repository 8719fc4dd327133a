"""The serving side: consume, batch, run models, publish results, commit offsets."""

from surge.workers.batcher import Batcher
from surge.workers.intake import Job, admit
from surge.workers.ledger import Ledger
from surge.workers.offsets import OffsetTracker
from surge.workers.replies import Replies
from surge.workers.repository import ModelRepository, scan
from surge.workers.tickets import Rejection, Router, Ticket
from surge.workers.worker import Worker, run, serve

__all__ = [
    # lifecycle
    "Worker",
    "run",
    "serve",
    # the pipeline, in order
    "Router",
    "Ticket",
    "Rejection",
    "Job",
    "admit",
    "Batcher",
    "Replies",
    # bookkeeping
    "Ledger",
    "OffsetTracker",
    "ModelRepository",
    "scan",
]

"""Telling "another rank of the job is gone" apart from a bug.

When a node dies (or one rank is killed), the survivors learn it from their next collective: gloo reports
``Connection reset by peer`` / ``Connection closed by peer`` within seconds, NCCL and the TCP store raise
``torch.distributed.DistError`` subclasses, and a rank that hangs instead of dying surfaces as a collective timeout
(``parallel`` timeout, 30 min by default). None of that is a bug of the trainer, and a 60-line traceback per rank
hides the one fact that matters: the run must be relaunched on every node, and it resumes from its last
checkpoint. :func:`lost_peer` recognises these errors; ``spin-train`` turns them into one line and exit code 3.
"""

from __future__ import annotations

import torch.distributed as dist

# Phrases of the transports' own messages (gloo's tcp pair, the c10d TCP store, NCCL's watchdog).
_PEER_PHRASES = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "timed out waiting",  # gloo: "Timed out waiting 1800000ms for recv operation to complete"
    "socket timeout",
    "communicator was aborted",
    "remote process exited",
)
# Only errors raised by the collective layers count: our own code never says "gloo" or "c10d".
_TRANSPORT_MARKS = ("gloo", "c10d", "nccl", "tcpstore", "socket")

EXIT_LOST_PEER = 3


def lost_peer(exc: BaseException) -> str | None:
    """A one-line account of the transport error when ``exc`` says a peer rank died or hung, else None."""
    text = str(exc)
    lowered = text.lower()
    is_dist_error = isinstance(exc, getattr(dist, "DistError", ()))
    from_transport = is_dist_error or any(mark in lowered for mark in _TRANSPORT_MARKS)
    if not (from_transport and (is_dist_error or any(p in lowered for p in _PEER_PHRASES))):
        return None
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(" This is typically caused", 1)[0].strip()  # gloo's generic advice, and an emoji
    if len(first) > 240:
        first = first[:237] + "..."
    return f"{type(exc).__name__}: {first}"

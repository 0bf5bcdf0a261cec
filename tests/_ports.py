"""Tests that start a process group on a port chosen free (``fastclip.bench.measure.free_port``):
the port is bound only once rank 0 has imported torch, seconds later, and another process on the
machine may take it meanwhile. Such a test runs once more on a new port."""


def port_taken(text: str) -> bool:
    """True when ``text`` (an exception's message or a rank's log) says the rendezvous port was
    already bound (torch's TCPStore: ``EADDRINUSE``, "address already in use")."""
    return "EADDRINUSE" in text or "address already in use" in text.lower()

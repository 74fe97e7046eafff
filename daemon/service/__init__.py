"""The daemon's service: a front (front.py: the one lock, the operations, the reads the HTTP layer
uses) over the owners of its state: the kernel side (kernel_side.py), the ledger of what is
saved and reported (ledger.py) and the Xray side (xray_side.py); loops.py runs it in the
background. The daemon's wiring (start, signals, stop) is daemon/main.py."""

from daemon.service.front import KeySpec, Service
from daemon.service.kernel_side import Established, Refresh

__all__ = ["Established", "KeySpec", "Refresh", "Service"]

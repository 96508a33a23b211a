"""Peak memory of a piece of work, measured above the point where the measurement was reset.

On CUDA this is ``torch.cuda.max_memory_allocated``. On CPU it is the process's resident-set
high-water mark: ``VmHWM`` is reset to the current resident set by writing "5" to
``/proc/self/clear_refs`` (``resource.getrusage``'s ``ru_maxrss`` cannot be reset), and the peak is
``VmHWM`` minus the resident set at the reset. Run each measured variant in a fresh process: memory
an earlier variant freed but the allocator kept would otherwise be reused without being counted.
"""

from __future__ import annotations

import re

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


class PeakMemory:
    """``reset()`` starts a measurement; ``peak_bytes()`` is the high-water mark above it since."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.baseline = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.baseline = _status_kib("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _status_kib("VmHWM") * 1024 - self.baseline

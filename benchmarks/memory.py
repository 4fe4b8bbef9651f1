"""Peak-memory probes for one fwd+bwd round.

extra_peak_bytes = peak - baseline - (bytes of the outputs and gradients the round produced)
                   + workspace the impl allocated up front
i.e. memory beyond the inputs, the outputs and the gradients: what the method itself needs.
baseline is taken after the inputs exist and the gradients of the previous round are dropped.

CPU: resident set size. /proc/self/clear_refs "5" resets the high-water mark VmHWM to the current
RSS; the peak is VmHWM after the round (fallback where clear_refs is not writable: ru_maxrss, which
cannot be reset, so that peak is the process's lifetime peak). GPU: torch.cuda allocator statistics.
"""
from __future__ import annotations

import gc
import os
import resource

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_round(step, device: torch.device) -> dict:
    """Run `step` once (gradients reset first) and return its memory figures."""
    step.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline, method = torch.cuda.memory_allocated(device), "cuda_max_memory_allocated"
        produced = step.run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        baseline = _rss()
        method = "vmhwm" if _reset_hwm() else "ru_maxrss"
        produced = step.run()
        peak = _vm_hwm() if method == "vmhwm" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    produced_bytes = sum(t.nbytes for t in produced if t is not None)
    del produced
    step.reset()
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "produced_bytes": produced_bytes,
        "workspace_bytes": step.workspace_bytes,
        "extra_peak_bytes": peak - baseline - produced_bytes + step.workspace_bytes,
        "mem_method": method,
    }

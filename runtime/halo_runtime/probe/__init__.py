"""`halo-run probe`: measure this board and write its *profile entry*, a one-device cluster profile
(YAML) that `halo-compile plan --cluster` accepts and `halo-compile profile merge` joins with the
other boards' entries.

What is measured, and how (modules: `board` memory, compute and storage;
`linkstats` the link's statistics, measured by `halo_runtime.net.probeclient` against
`net.proberesponder`; `entry` the
profile entry; `command` the `halo-run probe` command):

- memory: MemAvailable (/proc/meminfo; a cgroup v2 limit lowers it), in MiB as profiles count
  `memory_mb` (`halo_compile.cluster`: 1024 x 1024 bytes), minus a reserve for the OS;
- compute per weight format: the ggml products devices run (one graph of matrix x vector products,
  `core.ggmlops`), over distinct matrices filling a working set larger than the caches, as decode
  streams its weights; first, sustained (median of the second half) and p10-p90 GFLOP/s, at
  2 x rows x cols flops a product;
- storage (optional): a temporary file written, synced, dropped from the page cache, read back;
- the link to the coordinator (optional): round trips, loss and bursts per direction, bandwidth.

Example (each module's own examples are its doctests):
    >>> from halo_runtime.probe import burst_verdict, loss_statistics
    >>> burst_verdict([loss_statistics([True] * 10 + [False] * 3 + [True] * 6 + [False] + [True] * 20)]).written
    2.0
"""
from __future__ import annotations

from .board import (FORMAT_ORDER, MIB, ComputeProbe, FormatSpeed, StorageSpeed, measure_format, measure_storage,
                    memory_available, speed_of)
from .entry import Entry, check_identity, default_name, parse_power, primary_ipv4
from .linkstats import Bursts, LinkLoss, LinkReport, RttStats, burst_verdict, loss_statistics, rtt_statistics

__all__ = ["FORMAT_ORDER", "MIB", "Bursts", "ComputeProbe", "Entry", "FormatSpeed", "LinkLoss", "LinkReport",
           "RttStats", "StorageSpeed", "burst_verdict", "check_identity", "default_name", "loss_statistics",
           "measure_format", "measure_storage", "memory_available", "parse_power", "primary_ipv4",
           "rtt_statistics", "speed_of"]

"""A plan's remote devices as `Worker`s on loopback, in threads of the test process.

    with thread_workers(plan, shards) as workers:
        ex = UdpExchange(plan, peers(workers), policy, bind_host="127.0.0.1")
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from halo_runtime.net.worker import Worker


@contextmanager
def thread_workers(plan, shards: dict, shims: dict | None = None, view_source=None):
    """{device: Worker} of every remote device of `plan`, serving until the block ends; `shims`:
    device -> the shim its outgoing datagrams go through; view_source: what a worker's view of push
    rounds is made of (`Worker`'s)."""
    shims = shims or {}
    workers = {d: Worker(plan, d, shards[d], "127.0.0.1", 0, shim=shims.get(d), view_source=view_source)
               for d in plan.device_names if d != plan.coordinator}
    threads = [threading.Thread(target=w.serve_forever, daemon=True) for w in workers.values()]
    for t in threads:
        t.start()
    try:
        yield workers
    finally:
        for w in workers.values():
            w.close()
        for t in threads:
            t.join(timeout=2)


def peers(workers: dict) -> dict:
    """device -> (host, port) of `thread_workers`' workers."""
    return {d: ("127.0.0.1", w.address[1]) for d, w in workers.items()}

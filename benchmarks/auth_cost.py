"""Cost of datagram authentication per datagram (HMAC-SHA256 truncated to 16 bytes), on this machine.

Times, for a one-token fp16 partial sum of SmolLM2 (1,152 values: one datagram): the tag alone,
its check alone, and the whole send path (`wire.encode`) and receive path (`Reassembler.feed`:
length, tag, destination, replay window, reassembly) with the key. Single thread.

Example:
    $ .venv/bin/python -m benchmarks.auth_cost
"""
from __future__ import annotations

import json
import timeit

import torch
from halo_runtime.core.codec import encode_tensor
from halo_runtime.core.plandir import new_key
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.wire import Kind, Message, Reassembler, encode


def per_call_us(fn, n: int = 50_000) -> float:
    return round(min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6, 3)


def main() -> None:
    auth = Authenticator(new_key())
    msg = Message(Kind.REPLY_MLP_RELAXED, 1, 3, 4, 2, encode_tensor(torch.randn(1, 576), "fp16"))
    datagram = encode(msg, auth=auth)[0]
    body, tag = datagram[:-16], datagram[-16:]
    r = Reassembler(auth=auth, remember=0)
    fresh = iter([encode(msg, auth=auth)[0] for _ in range(160_000)])
    out = {"datagram_bytes": len(datagram),
           "tag_us": per_call_us(lambda: auth.tag(body)),
           "verify_us": per_call_us(lambda: auth.verify(body, tag)),
           "encode_us": per_call_us(lambda: encode(msg, auth=auth)),
           "feed_us": per_call_us(lambda: r.feed(next(fresh)))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""What protecting datagrams costs: the HMAC tag HALO used until 2026-12 against the AEADs that
could replace it (ChaCha20-Poly1305, which it uses now, and AES-256-GCM), per datagram and per token.

1. Per datagram, single thread, for a one-token fp16 partial sum of SmolLM2 (1,152 values: one
   1,210-byte datagram) and a 64-byte control datagram: seal and open alone (HMAC tag and check,
   each AEAD's encryption, decryption and refusal of a forgery); the same in a child process whose
   OpenSSL is told to ignore AES-NI and PCLMULQDQ (`OPENSSL_ia32cap`): what a CPU without AES
   instructions (a Raspberry Pi 4) sees, on this CPU's clock.
2. The whole send path (`wire.encode`) and receive path (`Reassembler.feed`: length, tag and
   decryption, destination, replay window, reassembly) per datagram with this runtime's scheme,
   with AES-256-GCM in its place and, with `--baseline-runtime DIR`, with the runtime in DIR (a
   directory holding an earlier `halo_runtime` package, for example this one with the auth.py,
   wire.py and codec.py of commit e9ec923, the last with HMAC), in a child process.
3. Per token (`--tokens N`, 0 to skip): `halo-run local` on the plan at 0 ms delay and no loss, N
   tokens and 1 token, alternately with this runtime and the baseline's: datagrams per token (both
   directions, prefill subtracted), TPOT of each, and the crypto's cost per token = datagrams per
   token x (seal + open) of a full datagram, and what the change added (both paths' difference).

Example:
    $ .venv/bin/python -m benchmarks.auth_cost --tokens 64 --repeats 3 --baseline-runtime /tmp/before \\
          --out benchmarks/results/auth_cost.json
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from halo_runtime.core.codec import HEADER_SIZE, TAG_LEN, encode_tensor
from halo_runtime.core.plandir import new_key
from halo_runtime.net.auth import Authenticator
from halo_runtime.net.wire import Kind, Message, Reassembler, encode

from benchmarks.benchcommon import ROOT, machine, percentiles

NO_AES_INSTRUCTIONS = "~0x200000200000000"
"""OPENSSL_ia32cap mask clearing CPUID.1:ECX bits 25 (AES-NI) and 1 (PCLMULQDQ)."""


class AesGcm(Authenticator):
    """The same per-session keys and nonces as the runtime's, with AES-256-GCM."""

    def _new_cipher(self, session: int):
        return AESGCM(self.derive(b"bench " + session.to_bytes(4, "big")))


def per_call_us(fn, n: int = 50_000) -> float:
    return round(min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6, 3)


def _messages() -> dict[str, Message]:
    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    big = Message(Kind.REPLY_MLP_RELAXED, 1, 3, 4, 2, encode_tensor(x, "fp16"))
    small = Message(Kind.HELLO, 1, 0, 0, 0, bytes(64 - HEADER_SIZE - TAG_LEN))
    return {"partial_sum": big, "control": small}


def primitives() -> dict:
    """Seal and open alone per datagram: HMAC (today), ChaCha20-Poly1305, AES-256-GCM."""
    key, nonce, out = new_key(), bytes(12), {}
    for name, msg in _messages().items():
        header, chunk = bytes(HEADER_SIZE), msg.payload
        mac = hmac.new(key, digestmod=hashlib.sha256)

        def tag():
            m = mac.copy()
            m.update(header)
            m.update(chunk)
            return m.digest()[:TAG_LEN]

        row = {"datagram_bytes": HEADER_SIZE + len(chunk) + TAG_LEN,
               "hmac_tag_us": per_call_us(tag),
               "hmac_verify_us": per_call_us(lambda: hmac.compare_digest(tag(), b"x" * TAG_LEN))}
        for cipher_name, cls in (("chacha20poly1305", ChaCha20Poly1305), ("aes256gcm", AESGCM)):
            c = cls(key)
            sealed = c.encrypt(nonce, chunk, header)
            row[f"{cipher_name}_seal_us"] = per_call_us(lambda: c.encrypt(nonce, chunk, header))
            row[f"{cipher_name}_open_us"] = per_call_us(lambda: c.decrypt(nonce, sealed, header))
            forged = sealed[:-1] + bytes([sealed[-1] ^ 1])

            def refuse():
                try:
                    c.decrypt(nonce, forged, header)
                except InvalidTag:
                    pass
            row[f"{cipher_name}_refuse_forged_us"] = per_call_us(refuse)
        out[name] = row
    return out


def paths(aes: bool = True) -> dict:
    """The whole send path (`encode`) and receive path (`Reassembler.feed`) per datagram, with the
    imported runtime's own scheme (and with AES-256-GCM in its place, if `aes`)."""
    key, out = new_key(), {}
    schemes = {"own": Authenticator(key), **({"aes256gcm": AesGcm(key)} if aes else {})}
    for name, msg in _messages().items():
        row = {}
        for scheme, auth in schemes.items():
            n = 20_000
            r = Reassembler(auth=auth, remember=0)
            fresh = iter([encode(msg, auth=auth)[0] for _ in range(5 * n + 10)])
            assert r.feed(next(fresh)) == msg
            row[f"{scheme}_encode_us"] = per_call_us(lambda: encode(msg, auth=auth), n)
            row[f"{scheme}_feed_us"] = per_call_us(lambda: r.feed(next(fresh)), n)
        out[name] = row
    if aes:
        derive = Authenticator(key)
        out["session_key_derivation_us"] = per_call_us(lambda: derive._new_cipher(12345), 20_000)
    return out


def _local(runtime: str | None, plan: str, tokens: int, prompt: str, draft: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if runtime:
        env["PYTHONPATH"] = runtime + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "halo_runtime.cli", "local", "--plan", plan, "--prompt", prompt, "--draft", draft,
           "--max-tokens", str(tokens), "--ignore-eos", "--json", "--quiet", "--plr", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(p.stdout)


def per_token(plan: str, tokens: int, repeats: int, baseline: str | None, prompt: str, draft: str) -> dict:
    """Datagrams and TPOT per token with this runtime (and the baseline's), alternating runs."""
    variants = {"aead": None, **({"baseline": baseline} if baseline else {})}
    runs = {v: [] for v in variants}
    for _ in range(repeats):
        for v, rt in variants.items():
            runs[v].append(_local(rt, plan, tokens, prompt, draft))
    out = {}
    for v, rt in variants.items():
        short = _local(rt, plan, 1, prompt, draft)
        first = short["exchange"]["datagrams_sent"] + short["exchange"]["datagrams_received"]
        per = [(r["exchange"]["datagrams_sent"] + r["exchange"]["datagrams_received"] - first) / (tokens - 1)
               for r in runs[v]]
        totals = [t["total_ms"] for r in runs[v] for t in r["per_token"][1:]]
        # with drafts a pass yields several tokens and per-token times are bimodal: the mean (time
        # over tokens) is the stable figure; the p50 is there for runs without drafts
        out[v] = {"runs": len(runs[v]), "tokens": tokens, "tokens_per_pass": runs[v][0]["tokens_per_pass"],
                  "datagrams_per_token": round(sum(per) / len(per), 1),
                  "ms_per_token_mean": round(sum(totals) / len(totals), 3),
                  "ms_per_token_mean_per_run": [round(sum(t["total_ms"] for t in r["per_token"][1:]) / (tokens - 1), 3)
                                                for r in runs[v]],
                  "tpot_ms": percentiles(totals), "tpot_p50_per_run": [r["tpot_ms"]["p50"] for r in runs[v]]}
    out["same_tokens_in_every_run"] = len({tuple(r["tokens"]) for v in runs for r in runs[v]}) == 1
    return out


def costs(tok: dict, result: dict) -> None:
    """Add to `tok` each scheme's crypto per token, and what the change added per token."""
    p = result["per_datagram"]["partial_sum"]
    n, token_ms = tok["aead"]["datagrams_per_token"], tok["aead"]["ms_per_token_mean"]
    for scheme, seal, open_ in (("hmac", "hmac_tag_us", "hmac_verify_us"),
                                ("chacha20poly1305", "chacha20poly1305_seal_us", "chacha20poly1305_open_us"),
                                ("aes256gcm", "aes256gcm_seal_us", "aes256gcm_open_us")):
        # every datagram is sealed once (by its sender) and opened once (by its receiver), in some
        # process; the full-size figure bounds the small datagrams' from above
        ms = n * (p[seal] + p[open_]) / 1000
        tok[f"{scheme}_ms_per_token"], tok[f"{scheme}_share_of_token"] = round(ms, 3), round(ms / token_ms, 4)
    if "baseline" in result["paths"]:
        # both paths of every datagram, this runtime's minus the baseline's
        now, before = result["paths"]["chacha20poly1305"]["partial_sum"], result["paths"]["baseline"]["partial_sum"]
        delta = now["own_encode_us"] + now["own_feed_us"] - before["own_encode_us"] - before["own_feed_us"]
        tok["added_us_per_datagram"] = round(delta, 3)
        tok["added_ms_per_token"] = round(n * delta / 1000, 3)
        tok["added_share_of_token"] = round(n * delta / 1000 / token_ms, 4)


def _child(flag: str, **env: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "benchmarks.auth_cost", flag], cwd=ROOT, env={**os.environ, **env},
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="artifacts/smollm2-135m-pi5")
    ap.add_argument("--prompt", default="Hello")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per run for the per-token part (0: skip it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drafts", default="lookup,none", help="--draft settings of the per-token runs")
    ap.add_argument("--baseline-runtime", help="directory holding an earlier halo_runtime package to compare")
    ap.add_argument("--primitives-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.primitives_only or args.paths_only:
        print(json.dumps(primitives() if args.primitives_only else paths(aes=False)))
        return
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": machine(),
              "per_datagram": primitives(), "paths": {"chacha20poly1305": paths()}}
    if args.baseline_runtime:
        result["paths"]["baseline"] = _child("--paths-only", PYTHONPATH=args.baseline_runtime)
    result["per_datagram_without_aes_instructions"] = _child("--primitives-only", OPENSSL_ia32cap=NO_AES_INSTRUCTIONS)
    if args.tokens:
        result["per_token"] = {}
        for draft in args.drafts.split(","):
            tok = result["per_token"][f"draft_{draft}"] = per_token(args.plan, args.tokens, args.repeats,
                                                                    args.baseline_runtime, args.prompt, draft)
            costs(tok, result)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

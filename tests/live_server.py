"""Helpers of the server tests: a live `halo-run serve --local` on loopback, and a plan copy that
carries a chat template.

    with Server(plan_dir, "--sync", "strict") as s:
        s.client.chat.completions.create(model=s.model, messages=[...])   # the official openai client
        s.get("/health")                                                  # (status, JSON)
"""
from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a tiny test model."
            "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A template with a default system message, the BOS token and a filter: unlike the ChatML fallback."""


def plan_with_template(plan_dir: Path, out: Path, template: str | None = TEMPLATE) -> Path:
    """A copy of `plan_dir` whose tokenizer_config.json carries `template` (manifest updated)."""
    from halo_runtime.core.chat import TokenizerConfig
    from halo_runtime.core.plandir import MANIFEST_FILE, TOKENIZER_CONFIG_FILE, manifest_text, read_manifest

    shutil.copytree(plan_dir, out)
    config = TokenizerConfig(chat_template=template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    (out / TOKENIZER_CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    files = sorted(set(read_manifest(out)) | {TOKENIZER_CONFIG_FILE})
    (out / MANIFEST_FILE).write_text(manifest_text(out, files))
    return out


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("HALO_KEY", "HALO_KEY_FILE"):
        env.pop(k, None)
    return env


def children(pid: int) -> dict[str, int]:
    """Device name -> pid of the `halo-run worker` processes started by process `pid`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"worker" in cmd and b"--device" in cmd:
            out[cmd[cmd.index(b"--device") + 1].decode()] = int(entry.name)
    return out


class Server:
    """`halo-run serve --plan PLAN --local --port 0 --plr 0 [extra]`; `close()` stops it and its workers."""

    def __init__(self, plan: Path, *extra: str, start_timeout: float = 120.0):
        import openai

        cmd = [sys.executable, "-m", "halo_runtime.cli", "serve", "--plan", str(plan), "--local", "--port", "0",
               "--plr", "0", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        self.workers: dict[str, int] = {}
        self.stderr: list[str] = []
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stdout, lines.put), daemon=True).start()
        try:
            line = lines.get(timeout=start_timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"halo-run serve did not start in {start_timeout:g} s: {''.join(self.stderr)}")
        m = re.search(r"http://([0-9.]+):(\d+)/ serving (\S+)", line)
        if not m:
            self.close()
            raise RuntimeError(f"unexpected first line {line!r}: {''.join(self.stderr)}")
        self.host, self.port, self.model = m.group(1), int(m.group(2)), m.group(3)
        self.workers = children(self.proc.pid)
        self.client = openai.OpenAI(base_url=f"http://{self.host}:{self.port}/v1", api_key="unused",
                                    max_retries=0, timeout=60)

    @staticmethod
    def _drain(stream, sink) -> None:
        for line in stream:
            sink(line)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict | str, dict]:
        """(status, JSON body or text, headers) of one raw HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read().decode()
            kind = resp.getheader("content-type", "")
            body = json.loads(data) if kind.startswith("application/json") else data
            return resp.status, body, dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict | str]:
        status, body, _ = self.request("GET", path)
        return status, body

    def kill_worker(self, device: str) -> None:
        os.kill(self.workers[device], signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.workers.values():  # a server killed hard leaves its workers behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() and _running(p) for p in self.workers.values()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

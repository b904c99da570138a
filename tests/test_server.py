"""`halo-run serve`: the official openai client against a live server on loopback
(`--local`: every device a process of its own), the chat template, health and metrics.

Exactness tests run the server with `--sync strict` (every part awaited, so the tokens depend only
on the plan), as does the `halo-run local` they compare with; the device-failure test runs it
relaxed. Every test's loops are bounded and every process is stopped (tests/live_server.py).
"""
from __future__ import annotations

import ast
import doctest
import importlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from halo_runtime.core.chat import ChatTemplate, load_tokenizer_config  # noqa: E402
from halo_runtime.core.plan import load_plan  # noqa: E402
from halo_runtime.core.plandir import TOKENIZER_FILE, sha256_file  # noqa: E402
from halo_runtime.core.tokenizer import Tokenizer  # noqa: E402
from live_server import TEMPLATE, Server, plan_with_template  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def chat_plan(plan_dir, tmp_path_factory) -> Path:
    return plan_with_template(plan_dir, tmp_path_factory.mktemp("served") / "plan")


@pytest.fixture(scope="module")
def server(chat_plan):
    with Server(chat_plan, "--sync", "strict") as s:
        yield s


def _chat(server, content: str, max_tokens: int, **kw):
    return server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                                 max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw)


def _metrics(server) -> dict:
    status, text = server.get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- the checks the issue names -------------------------------------------------------------------

def test_streamed_chat_arrives_as_several_chunks(server):
    stream = _chat(server, "Tell me about the sea.", 12, stream=True, stream_options={"include_usage": True},
                   extra_body=IGNORE_EOS)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, chunks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    whole = _chat(server, "Tell me about the sea.", 12, extra_body=IGNORE_EOS)
    assert "".join(pieces) == whole.choices[0].message.content


def test_greedy_chat_equals_halo_run_generate_chat(server, chat_plan):
    prompt, n = "What is a Raspberry Pi?", 16
    reply = _chat(server, prompt, n)
    local = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "local", "--plan", str(chat_plan), "--chat",
                            "--prompt", prompt, "--max-tokens", str(n), "--sync", "strict", "--plr", "0", "--json",
                            "--quiet"], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    expected = json.loads(local.stdout)
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.completion_tokens == len(expected["tokens"])
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    # and the prompt is the model's template, not the ChatML fallback
    tok = Tokenizer.from_file(chat_plan / TOKENIZER_FILE)
    rendered = ChatTemplate(load_tokenizer_config(chat_plan)).render([{"role": "user", "content": prompt}])
    assert rendered.startswith("<|im_start|><|im_start|>system\nYou are a tiny test model.")
    assert expected["prompt_tokens"] == len(tok.encode(rendered))


def test_ten_concurrent_clients_each_get_their_single_client_answer(server):
    prompts = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(10)]
    alone = [_chat(server, p, 5).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda p: _chat(server, p, 5).choices[0].message.content, prompts[::-1]))[::-1]
    assert together == alone
    assert len(set(alone)) > 1  # different prompts, different answers: the comparison means something


@pytest.mark.parametrize("case", ["malformed JSON", "unknown model", "over-long prompt", "max_tokens 0",
                                  "max_tokens past the context", "temperature 3", "n 2", "oversized body",
                                  "not a JSON object", "wrong method", "no such path", "token id out of range"])
def test_bad_requests_get_json_errors_and_the_server_answers_the_next(server, case):
    post = lambda body, path="/v1/chat/completions": server.request(  # noqa: E731
        "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
        {"Content-Type": "application/json"})
    ok = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    status, body, _ = {
        "malformed JSON": lambda: post(b'{"model": "x", "messages": [}'),
        "unknown model": lambda: post({**ok, "model": "gpt-4"}),
        "over-long prompt": lambda: post({**ok, "messages": [{"role": "user", "content": "sea " * 400}]}),
        "max_tokens 0": lambda: post({**ok, "max_tokens": 0}),
        "max_tokens past the context": lambda: post({**ok, "max_tokens": 100_000}),
        "temperature 3": lambda: post({**ok, "temperature": 3}),
        "n 2": lambda: post({**ok, "n": 2}),
        "oversized body": lambda: post({**ok, "pad": "x" * (1 << 21)}),
        "not a JSON object": lambda: post([1, 2]),
        "wrong method": lambda: server.request("GET", "/v1/chat/completions"),
        "no such path": lambda: server.request("GET", "/v2/anything"),
        "token id out of range": lambda: post({"model": server.model, "prompt": [10 ** 9]}, "/v1/completions"),
    }[case]()
    expected = {"unknown model": 404, "oversized body": 413, "wrong method": 405, "no such path": 404}.get(case, 400)
    assert status == expected, body
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if case == "over-long prompt":
        assert body["error"]["code"] == "context_length_exceeded"
    assert _chat(server, "hi", 2).usage.completion_tokens >= 1


def test_openai_client_raises_its_own_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        _chat(server, "sea " * 400, 4)


def test_metrics_parse_and_health_lists_every_device(server, chat_plan):
    _chat(server, "Count to three.", 4, extra_body=IGNORE_EOS)
    samples = _metrics(server)
    names = {name for name, _ in samples}
    for family in ("halo_tpot_seconds_bucket", "halo_tokens_generated_total", "halo_device_observed_loss",
                   "halo_compensated_share", "halo_retransmissions_total", "halo_device_up"):
        assert family in names, family
    assert samples[("halo_tokens_generated_total", ())] >= 4
    assert samples[("halo_tpot_seconds_count", ())] >= 3
    plan = load_plan(chat_plan)
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok", health
    assert [d["name"] for d in health["devices"]] == list(plan.device_names)
    assert all(d["up"] for d in health["devices"])
    assert health["plan_fingerprint"] == sha256_file(chat_plan / "plan.json")
    assert health["weights_format"] == "fp32" and health["model"] == server.model
    assert [m.id for m in server.client.models.list()] == [server.model]


def test_completions_stream_stop_strings_and_seeds(server):
    c = server.client.completions
    text = c.create(model=server.model, prompt="The sea is", max_tokens=16, temperature=0,
                    extra_body=IGNORE_EOS).choices[0].text
    assert len(text) > 8
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = c.create(model=server.model, prompt="The sea is", max_tokens=16, temperature=0, stop=[stop],
                   extra_body=IGNORE_EOS).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.find(stop)], "stop")
    streamed = [ch.choices[0].text for ch in c.create(model=server.model, prompt="The sea is", max_tokens=16,
                                                       temperature=0, stream=True, extra_body=IGNORE_EOS)]
    assert "".join(streamed) == text and len([s for s in streamed if s]) >= 3
    sampled = [c.create(model=server.model, prompt="The sea is", max_tokens=8, temperature=1.0, top_p=0.9, seed=42,
                        extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_client_that_goes_away_cancels_its_generation(server):
    before = _metrics(server)
    stream = _chat(server, "Tell me a long story.", 200, stream=True, extra_body=IGNORE_EOS)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 2:
            break
    stream.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = _metrics(server)
        if after[("halo_requests_total", (("outcome", "cancelled"),))] > \
                before[("halo_requests_total", (("outcome", "cancelled"),))]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the generation was not cancelled")
    generated = after[("halo_tokens_generated_total", ())] - before[("halo_tokens_generated_total", ())]
    assert generated < 100, generated
    assert _chat(server, "hi", 2).usage.completion_tokens >= 1


# ---- devices that die ---------------------------------------------------------------------------

def _holding(health: dict, holds: str) -> str:
    return next(d["name"] for d in health["devices"] if d["holds"] == holds)


def test_killed_workers_relaxed_reply_completes_critical_gives_503(chat_plan):
    with Server(chat_plan, "--dead-after", "2") as server:
        _, health = server.get("/health")
        relaxed, critical = _holding(health, "relaxed"), _holding(health, "critical")
        stream = _chat(server, "Tell me about the sea.", 40, stream=True, stream_options={"include_usage": True},
                       extra_body=IGNORE_EOS)
        seen, last, killed = 0, None, None
        for chunk in stream:
            last = chunk
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 3 and relaxed in server.workers:
                server.kill_worker(relaxed)
                killed = server.workers.pop(relaxed)
        assert killed and last.usage.completion_tokens == 40  # the reply completed, compensated
        status, health = server.get("/health")
        state = {d["name"]: d["status"] for d in health["devices"]}
        assert status == 200 and health["status"] == "degraded" and state[relaxed] in ("down", "exited"), health
        t0 = time.monotonic()
        assert _chat(server, "hi", 3, extra_body=IGNORE_EOS).usage.completion_tokens == 3
        assert time.monotonic() - t0 < 4.5, "a device already down must not be awaited again"

        server.kill_worker(critical)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as err:
                _chat(server, "hi", 3, stream=stream)
            assert err.value.status_code == 503 and "device" in err.value.message, err.value
        assert server.alive()
        status, health = server.get("/health")
        assert status == 503 and health["status"] == "unavailable", health
        assert [m.id for m in server.client.models.list()] == [server.model]
        assert _metrics(server)[("halo_requests_total", (("outcome", "failed"),))] == 2


# ---- the chat template ----------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  hi  "},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is 2+2?"}]
LLAMA3_LIKE = ("{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n"
               "    {%- set system = messages[0]['content'] %}\n    {%- set messages = messages[1:] %}\n"
               "{%- else %}\n    {%- set system = 'Today is ' + strftime_now('%Y') %}\n{%- endif %}\n"
               "<|im_start|>system\n{{ system }}<|im_end|>\n{% for m in messages %}\n"
               "  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
               "  <|im_start|>{{ m['role'] }}\n{{ m['content'] | tojson }}<|im_end|>\n{% endfor %}\n"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [TEMPLATE, LLAMA3_LIKE], ids=["system-default", "llama3-like"])
def test_template_renders_and_tokenizes_as_transformers_does(plan_dir, template, tmp_path):
    from halo_runtime.core.chat import TokenizerConfig
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(plan_dir / TOKENIZER_FILE), bos_token="<|im_start|>",
                                 eos_token="<|im_end|>")
    hf.chat_template = template
    ours = ChatTemplate(TokenizerConfig(chat_template=template, bos_token="<|im_start|>", eos_token="<|im_end|>"))
    tok = Tokenizer.from_file(plan_dir / TOKENIZER_FILE)
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render(messages) == text
        if "<|im_start|>" in tok.added:  # else transformers would add the special tokens as new ids
            ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert tok.encode(ours.render(messages)) == list(ids)
    if template == LLAMA3_LIKE:
        with pytest.raises(ValueError, match="bad role"):
            ours.render([{"role": "tool", "content": "x"}])


def test_a_plan_without_a_template_falls_back_to_chatml_with_one_warning(plan_copy, capsys):
    from halo_runtime.cli import _prompt_ids
    from halo_runtime.core.plandir import TOKENIZER_CONFIG_FILE

    (plan_copy / TOKENIZER_CONFIG_FILE).unlink(missing_ok=True)
    tok = Tokenizer.from_file(plan_copy / TOKENIZER_FILE)
    ids = [_prompt_ids(tok, "hi", True, str(plan_copy)) for _ in range(2)]
    assert ids[0] == ids[1] == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert capsys.readouterr().err.count("using ChatML") == 1


def test_the_compiler_carries_the_template_into_the_plan(tmp_path, plan_dir):
    from halo_runtime.core.plandir import TOKENIZER_CONFIG_FILE, read_manifest

    from halo_compile.load import tokenizer_config

    assert TOKENIZER_CONFIG_FILE in read_manifest(plan_dir)
    assert TOKENIZER_CONFIG_FILE in read_manifest(ROOT / "artifacts" / "smollm2-135m-pi5")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "model_max_length": 4096,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    cfg = tokenizer_config(hf)
    assert (cfg.chat_template, cfg.bos_token, cfg.eos_token) == ("D", "<s>", "</s>")
    (hf / "chat_template.jinja").write_text("J")  # where transformers saves it: it wins
    assert tokenizer_config(hf).chat_template == "J"
    (hf / "tokenizer_config.json").write_text('{"chat_template": 3}')
    from halo_compile.load import ModelError
    with pytest.raises(ModelError, match="tokenizer_config.json"):
        tokenizer_config(hf)


@pytest.mark.slow
def test_the_builtin_gguf_template_comes_from_its_metadata(tmp_path):
    pytest.importorskip("gguf")
    from halo_compile.load import BUILTIN_MODELS, ModelError, _builtin_gguf, _with_chat_template

    try:
        gguf = _builtin_gguf(next(iter(BUILTIN_MODELS)))
    except ModelError as e:
        pytest.skip(str(e))
    _with_chat_template(gguf, tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


# ---- the walls ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["halo_runtime.server.app", "halo_runtime.server.schemas",
                                  "halo_runtime.server.engine", "halo_runtime.server.jobs",
                                  "halo_runtime.server.metrics"])
def test_module_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed


def test_workers_never_load_the_server_packages():
    runtime = ROOT / "runtime" / "halo_runtime"
    server_deps = ("starlette", "uvicorn", "prometheus_client", "halo_runtime.server", "jinja2")
    for path in [*runtime.glob("core/*.py"), *runtime.glob("net/*.py"), *runtime.glob("storage/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [("." * node.level) + (node.module or "")] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.lstrip(".").startswith(("server", *server_deps[:-1]))]
            assert not bad, f"{path.relative_to(runtime)} imports {bad}"
    code = ("import sys, halo_runtime.cli, halo_runtime.net.worker, halo_runtime.storage.streaming\n"
            "halo_runtime.cli.build_parser()\n"
            f"print([m for m in sys.modules if m.startswith({server_deps!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_taken_port_is_one_error_line(chat_plan):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "halo_runtime.cli", "serve", "--plan", str(chat_plan), "--local",
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"halo-run: error: cannot listen on 127.0.0.1:{port}: Address already in use"], r.stderr

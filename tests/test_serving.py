"""The server under concurrent clients, and its OpenAI surface through the official `openai`
client (tiny model, CPU, the real server in a subprocess)."""

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from medvl.http.validate import free_port, running_server, wait_ready
from medvl.medical.records import RECORD_SCHEMA

TIMEOUT_S = 1  # a 3-row, 960-token answer takes ~2.6 s on the 2-core CPU (measured 2.4 s for 900)


@pytest.fixture(scope="module")
def server(phases_1_2):
    with running_server(phases_1_2, extra_args=["--max-new-tokens", "48", "--max-batch-size", "4",
                                                "--set", "api.source_boxes=false"]) as base:  # no OCR: CPU time
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def page_png():
    buffer = io.BytesIO()
    Image.effect_noise((320, 320), 40).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def messages(page_png):
    url = "data:image/png;base64," + base64.b64encode(page_png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "List the medications."}]}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["medvl"]


def test_max_tokens_applies_per_request(client, messages):
    short = client.chat.completions.create(model="medvl", messages=messages, max_tokens=3, extra_body={"ignore_eos": True})
    longer = client.chat.completions.create(model="medvl", messages=messages, max_tokens=9, extra_body={"ignore_eos": True})
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    assert (longer.usage.completion_tokens, longer.choices[0].finish_reason) == (9, "length")


def test_seeded_sampling_repeats(client, messages):
    def sample(seed):
        return client.chat.completions.create(model="medvl", messages=messages, max_tokens=12, temperature=1.0,
                                              top_p=0.95, seed=seed).choices[0].message.content

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    greedy = client.chat.completions.create(model="medvl", messages=messages, max_tokens=12)
    assert sample(11) != greedy.choices[0].message.content  # temperature is applied, not ignored


def test_stop_strings_cut_the_answer(client, messages):
    full = client.chat.completions.create(model="medvl", messages=messages, max_tokens=16,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[5:8]
    cut = client.chat.completions.create(model="medvl", messages=messages, max_tokens=16, stop=[stop],
                                         extra_body={"ignore_eos": True}).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_stream_with_include_usage_ends_with_usage(client, messages):
    whole = client.chat.completions.create(model="medvl", messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model="medvl", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_logprobs_with_three_alternatives_streamed_and_not(client, messages):
    """The official client, logprobs=True, top_logprobs=3: every token has its log-probability and
    three alternatives, streamed and not (the same entries); a greedy token is the most likely,
    also under a JSON schema (the probability among the tokens it allows); the tokens' bytes make
    the answer."""
    kwargs = {"model": "medvl", "messages": messages, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    plain = client.chat.completions.create(**kwargs).choices[0]
    entries = plain.logprobs.content
    assert len(entries) == client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None}
                                                          ).usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace").startswith(plain.message.content)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    schema = {"type": "json_schema", "json_schema": {"name": "drug", "schema": DRUG_SCHEMA}}
    constrained = client.chat.completions.create(**kwargs, response_format=schema).choices[0].logprobs.content
    for entry in [*entries, *constrained]:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):  # OpenAI's limit is 20
        client.chat.completions.create(**{**kwargs, "top_logprobs": 21})


@pytest.mark.parametrize("params, name", [
    ({"n": 2}, "n"),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"ignore_eos": True}}, "ignore_eos"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"best_of": 2}}, "best_of"),
])
def test_parameters_not_honoured_are_refused_by_name(client, messages, params, name):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="medvl", messages=messages, max_tokens=4, **params)
    assert refused.value.body["param"] == name and name in refused.value.body["message"]


DRUG_SCHEMA = {"type": "object", "properties": {"drug": {"type": "string"}, "dose_mg": {"type": "integer"},
                                              "route": {"enum": ["oral", "iv"]}},
               "required": ["drug", "dose_mg", "route"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_returns_json_valid_against_it(client, messages, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "drug", "schema": DRUG_SCHEMA, "strict": True}}
    for temperature in (0.0, 1.0):
        answer = client.chat.completions.create(model="medvl", messages=messages, max_tokens=80, stream=stream,
                                                temperature=temperature, seed=3, response_format=fmt)
        text = ("".join(c.choices[0].delta.content or "" for c in answer) if stream
                else answer.choices[0].message.content)
        jsonschema.validate(json.loads(text), DRUG_SCHEMA)


def test_response_format_json_object_returns_an_object(client, messages):
    answer = client.chat.completions.create(model="medvl", messages=messages, max_tokens=40,
                                            response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_schema_that_does_not_compile_is_a_400_naming_response_format(client, messages):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(["}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="medvl", messages=messages, max_tokens=8, response_format=bad)
    body = refused.value.body
    assert body["param"] == "response_format" and body["code"] == "invalid_response_format" and "unclosed character class" in body["message"]


def test_extract_answers_parse_as_json_valid_against_the_record_schema(server, page_png):
    """/extract decodes under the record's schema: even the random stand-in's answer is JSON."""
    body = httpx.post(f"{server}/extract", files={"file": ("p.png", page_png, "image/png")}, timeout=120).json()
    assert body["parse_status"] == "json"
    jsonschema.validate(json.loads(body["raw_text"]), RECORD_SCHEMA)


def test_a_request_longer_than_the_context_is_a_400_naming_the_limit(client, messages):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="medvl", messages=messages, max_tokens=5000)
    assert refused.value.body["code"] == "context_length_exceeded" and "decode.max_cache_len" in str(refused.value)


def test_a_streamed_request_over_the_context_is_the_same_400(client, messages):
    """Validated and submitted before the stream starts: the client gets the 400 (it once got a
    200 and an empty event stream, without an error event or [DONE])."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="medvl", messages=messages, max_tokens=5000, stream=True)
    assert refused.value.body["code"] == "context_length_exceeded"


def test_max_tokens_defaults_to_the_context_left(server, client, messages):
    """Without max_tokens an answer may use the context the prompt leaves (capped by
    api.max_new_tokens): a prompt near the limit is answered, not refused for a parameter the
    client never sent; one that leaves no room is a 400 naming the prompt."""
    def prompt_tokens(words: int) -> int:
        return client.chat.completions.create(model="medvl", max_tokens=1, messages=[
            {"role": "user", "content": "BID " * words}]).usage.prompt_tokens

    first, second = prompt_tokens(100), prompt_tokens(200)
    words = 100 + round((1016 - first) * 100 / (second - first))  # a prompt 8 tokens short of the context
    near = client.chat.completions.create(model="medvl", messages=[{"role": "user", "content": "BID " * words}],
                                          extra_body={"ignore_eos": True})
    assert 1024 - 48 < near.usage.prompt_tokens < 1024  # less room than the server's --max-new-tokens 48
    assert near.usage.prompt_tokens + near.usage.completion_tokens == 1024  # the answer took the room left
    with pytest.raises(openai.BadRequestError) as refused:
        over = [{"role": "user", "content": [messages[0]["content"][0], {"type": "text", "text": "BID " * words}]}]
        client.chat.completions.create(model="medvl", messages=over)  # the page's tokens on top: over 1,024
    assert refused.value.body["param"] == "messages" and "leaves no room" in refused.value.body["message"]


def test_chats_at_the_exact_limit_beside_pages_all_answer(server, client, page_png):
    """Issue 30's reproduction over HTTP: text-only chats whose prompt + max_tokens is exactly the
    context, sent together with /extract pages (prefilled in one batch with them), once answered
    500 (a write past the cache); every one answers 200 with all its tokens."""
    text = [{"role": "user", "content": "Name one drug and its dose."}]
    exact = 1024 - client.chat.completions.create(model="medvl", max_tokens=1, messages=text).usage.prompt_tokens

    def chat(_):
        return client.chat.completions.create(model="medvl", max_tokens=exact, messages=text,
                                              extra_body={"ignore_eos": True}).usage.completion_tokens

    def extract(_):
        return httpx.post(f"{server}/extract", files={"file": ("p.png", page_png, "image/png")}, timeout=300).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        pages = [pool.submit(extract, i) for i in range(2)]
        chats = [pool.submit(chat, i) for i in range(2)]
        assert [c.result() for c in chats] == [exact, exact] and [p.result() for p in pages] == [200, 200]


def test_an_unknown_model_is_a_404(client, messages):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)


def test_64_concurrent_requests_over_every_route_all_answer(server, page_png, messages):
    chat = {"model": "medvl", "max_tokens": 8, "messages": messages}

    def one(i: int) -> int:
        with httpx.Client(base_url=server, timeout=120) as http:
            kind = i % 4
            if kind == 0:
                r = http.post("/extract", files={"file": ("p.png", page_png, "image/png")})
            elif kind == 1:
                r = http.post("/analyze", files={"file": ("p.png", page_png, "image/png")}, data={"prompt": "Summarise."})
            elif kind == 2:
                r = http.post("/v1/chat/completions", json=chat)
            else:
                with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                    lines = [line for line in r.iter_lines() if line]
                    assert lines[-1] == "data: [DONE]"
            return r.status_code

    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(one, range(64)))
    assert statuses == [200] * 64


@pytest.fixture(scope="module")
def impatient_server(phases_1_2):
    """Four slots and a request timeout shorter than a 960-token answer takes on a CPU."""
    args = ["--max-new-tokens", "16", "--max-batch-size", "4", "--request-timeout-s", str(TIMEOUT_S)]
    with running_server(phases_1_2, extra_args=args) as base:
        yield base


def test_timed_out_and_abandoned_requests_free_their_slots(impatient_server):
    """Every slot is filled with answers longer than the request timeout: they end in 504 (and a
    stream whose client hangs up ends too), then the next 16 requests all answer."""
    server = impatient_server
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    text_only = [{"role": "user", "content": "Write a long discharge summary."}]

    def too_long(_):
        try:
            client.chat.completions.create(model="medvl", messages=text_only, max_tokens=960,
                                           extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            return exc.status_code
        return 200

    with ThreadPoolExecutor(max_workers=3) as pool:
        hung_up = pool.submit(hang_up_mid_stream, server, text_only)
        statuses = list(pool.map(too_long, range(3)))
        hung_up.result()
    assert statuses == [504] * 3
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/health", timeout=5).json()["requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server}/health", timeout=5).json()["requests_running"] == 0
    answers = [client.chat.completions.create(model="medvl", messages=text_only, max_tokens=4) for _ in range(16)]
    assert all(a.usage.completion_tokens > 0 for a in answers)


def hang_up_mid_stream(server: str, messages: list) -> None:
    body = {"model": "medvl", "messages": messages, "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server, timeout=30) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # closing the connection here cancels the request


def test_overload_is_a_503_with_retry_after(phases_1_2):
    """One slot and a waiting queue of one: of eight simultaneous long requests, those that find
    the queue full are told to come back, none waits without bound."""
    args = ["--max-batch-size", "1", "--set", "decode.max_waiting=1", "--max-new-tokens", "200"]
    with running_server(phases_1_2, extra_args=args) as base:
        def one(_):
            r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": "medvl", "max_tokens": 200, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Write a long note."}]})
            return r.status_code, r.headers.get("retry-after"), r.json()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(8)))
        refused = [r for r in results if r[0] == 503]
        assert refused and all(r[1] and r[2]["error"]["code"] == "overloaded" for r in refused)
        assert {r[0] for r in results} <= {200, 503} and any(r[0] == 200 for r in results)
        # streamed, the same 503 (submitted before the stream starts), as the openai client sees it
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

        def streamed(_):
            try:
                for _chunk in client.chat.completions.create(
                        model="medvl", max_tokens=200, stream=True, extra_body={"ignore_eos": True},
                        messages=[{"role": "user", "content": "Write a long note."}]):
                    pass
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(streamed, range(8)))
    assert 503 in statuses and set(statuses) <= {200, 503}


# The server with a decoding step that fails once a marker file exists (the test creates it after
# start-up): the injected failure stands for a CUDA error in a compiled step.
FAILING_SERVER = """
import pathlib, sys
from medvl.engine.slot_cache import SlotDecoder
marker, step = pathlib.Path(sys.argv[1]), SlotDecoder.step
def failing_step(self, rows):
    if marker.exists():
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")
    return step(self, rows)
SlotDecoder.step = failing_step
from medvl.http.server import main
main(sys.argv[2:])
"""


def test_a_dead_engine_makes_health_503_and_the_process_exit_non_zero(phases_1_2, tmp_path):
    marker = tmp_path / "fail-now"
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAILING_SERVER, str(marker), "--workdir", str(phases_1_2),
                                 "--port", str(port), "--set", "api.dead_engine_exit_s=3"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, 300, log_path)
        marker.touch()
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "medvl", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "dead" and "injected" in health.json()["error"]
        again = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "medvl", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=60) == 1  # after the grace period: a supervisor restarts it
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_served_model_keeps_its_compiled_steps_where_a_restart_finds_them(tiny_model_dir, tiny_settings,
                                                                             tmp_path, monkeypatch):
    """api.compile_cache_dir: Inductor's and Triton's caches in the workdir (on Kubernetes, the volume
    every replica mounts), not in the container's /tmp; empty leaves torch's own."""
    from medvl.core.settings import load_settings
    from medvl.core.workdir import Workdir
    from medvl.engine.loader import open_served

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    open_served(load_settings("tiny", ["api.compile_cache_dir="]), Workdir(tmp_path), str(tiny_model_dir))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_DIR" not in os.environ
    open_served(tiny_settings, Workdir(tmp_path), str(tiny_model_dir))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "compile" / "triton")
    elsewhere = tmp_path / "shared"
    open_served(load_settings("tiny", [f"api.compile_cache_dir={elsewhere}"]), Workdir(tmp_path), str(tiny_model_dir))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(elsewhere / "inductor") and elsewhere.is_dir()

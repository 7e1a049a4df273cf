"""The OpenAI-compatible HTTP server (clusterkv_local/server.py, `clusterkv-local serve`).

Reference: the same Llama called directly with the same parameters (temperature 0, or a seed):
every endpoint must give the same text as the call it wraps, streamed or not, in OpenAI's
shapes; bad requests get a 4xx with OpenAI's error body and leave the server serving.
"""
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import N_THREADS, require_native

require_native()
from clusterkv_local import Llama  # noqa: E402
from clusterkv_local.server import Server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def served(default_model_path):
    llm = Llama(default_model_path, n_ctx=512, n_threads=N_THREADS, seed=7, verbose=False)
    server = Server(llm, port=0, model_name="smol").start()
    yield server, llm
    server.close()
    llm.close()


def post(server, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def events(text):
    """The data of each server-sent event."""
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_models_and_health(served):
    server, _ = served
    with urllib.request.urlopen(server.url + "/v1/models") as r:
        models = json.load(r)
    assert models["object"] == "list" and models["data"][0]["id"] == "smol"
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.load(r) == {"status": "ok"}


def test_completion_matches_the_direct_call(served):
    server, llm = served
    body = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 12,
            "temperature": 0, "stop": ["\n"], "user": "ignored", "seed": None, "logit_bias": None}
    status, kind, text = post(server, "/v1/completions", body)
    assert status == 200 and kind == "application/json"
    out = json.loads(text)
    want = llm("The capital of France is", max_tokens=12, temperature=0, stop=["\n"])
    assert out["choices"][0]["text"] == want["choices"][0]["text"]
    assert out["model"] == "smol" and out["usage"] == want["usage"]
    status, kind, text = post(server, "/v1/completions", dict(body, stream=True))
    assert status == 200 and kind == "text/event-stream"
    data = events(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]


def test_chat_matches_the_direct_call(served):
    server, llm = served
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"messages": messages, "max_completion_tokens": 10, "temperature": 0.9, "seed": 3,
            "logit_bias": {"28": -100}}
    status, _, text = post(server, "/v1/chat/completions", body)
    assert status == 200
    got = json.loads(text)["choices"][0]["message"]
    want = llm.create_chat_completion(messages, max_tokens=10, temperature=0.9, seed=3,
                                      logit_bias={28: -100})["choices"][0]["message"]
    assert got == want
    status, _, text = post(server, "/v1/chat/completions", dict(body, stream=True))
    chunks = [json.loads(d) for d in events(text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want["content"]


def test_bad_requests_get_openai_errors(served):
    server, _ = served
    cases = [
        ("/v1/completions", None, b"{not json", 400),
        ("/v1/completions", {"prompt": "x", "n": 2}, None, 400),
        ("/v1/completions", {"max_tokens": 3}, None, 400),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, 400),
        ("/v1/completions", {"prompt": "word " * 600}, None, 400),   # longer than n_ctx
        ("/v1/chat/completions", {"messages": "hi"}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "tool_choice": "always", "tools": []}, None, 400),
        ("/v1/embeddings", {"input": "x"}, None, 400),                # not started for it
        ("/v1/nothing", {}, None, 404),
    ]
    for path, body, raw, status in cases:
        got, kind, text = post(server, path, body, raw)
        assert got == status, (path, body, text)
        error = json.loads(text)["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert "exceed context window" in json.loads(post(server, "/v1/completions", cases[4][1])[2])[
        "error"]["message"]
    # still serving
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200


def test_concurrent_requests_queue(served):
    server, llm = served
    prompts = ["One, two,", "Red, green,", "Monday, Tuesday,"]
    want = {p: llm(p, max_tokens=6, temperature=0)["choices"][0]["text"] for p in prompts}
    got = {}

    def ask(p):
        got[p] = json.loads(post(server, "/v1/completions",
                                 {"prompt": p, "max_tokens": 6, "temperature": 0})[2])

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p: r["choices"][0]["text"] for p, r in got.items()} == want


def test_embeddings(default_model_path):
    with Llama(default_model_path, n_ctx=256, n_threads=N_THREADS, embedding=True,
               pooling_type="mean", verbose=False) as llm:
        server = Server(llm, port=0, model_name="smol-embed").start()
        try:
            status, _, text = post(server, "/v1/embeddings", {"input": ["a cat", "a dog"]})
            out = json.loads(text)
            want = llm.create_embedding(["a cat", "a dog"], model="smol-embed")
            assert status == 200 and out == json.loads(json.dumps(want))
        finally:
            server.close()


def test_cli_serve(default_model_path):
    proc = subprocess.Popen([sys.executable, "-m", "clusterkv_local", "serve", "-m", default_model_path,
                             "--port", "0", "-c", "256", "-t", str(N_THREADS)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"at (http://\S+)/v1", line).group(1)
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
            name = json.load(r)["data"][0]["id"]
        assert name == os.path.basename(default_model_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

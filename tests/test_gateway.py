"""The OpenAI-compatible gateway (fmplex/gateway/), tested with OpenAI's own Python client (sync,
async, streaming) against a real `fmplex gateway` process in front of a real daemon (tiny BERT,
tiny Llama, tiny DINOv2, Fracast-0) and real task processes. Answers equal what fmplex's own client
gets; keys reach only their owner's tasks; bad keys, oversized bodies, malformed JSON and
unsupported fields get OpenAI's error body with the right status; an overloaded task is a 429
with Retry-After, a missed deadline a 504; a client that disconnects cancels its generation."""
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ipc.messages import (PROTOCOL_VERSION, ExtensionSpec, Family, Info, ListTasks, Register,
                          TaskConfig)
from testkit.launch import REPO, Daemon, GatewayProc, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_head, write_tiny_vision

NOBODY = 65534
KEY_ROOT = "sk-fmplex-root-0123456789abcdef"
KEY_NOBODY = "sk-fmplex-nobody-fedcba9876543210"
HIDDEN = 32
WAIT_S = 60
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def world(tiny_bert, tiny_llama, tmp_path_factory):
    vision = write_tiny_vision(str(tmp_path_factory.mktemp("tiny-dinov2")), "dinov2", seed=3)
    d = Daemon({"default": tiny_bert, "llama": tiny_llama, "vision": vision,
                "series": "embedded:fracast"},
               config="heartbeat_ms = 500\nliveness_ms = 10000\nkv_pool_mb = 4").start()
    specs = short_tmpdir("fmx-gw-")
    write_random_head(os.path.join(specs, "head.safetensors"), 3, HIDDEN, seed=1)
    labels = 'labels = ["a", "b", "c"]\n[extension]\nhead = "head.safetensors"'
    bodies = {"chat": 'pipeline = "text-generation"\nbackbone = "llama"\n'
                      '[generation]\nmax_tokens = 16',
              "emb": 'pipeline = "text-embedding"',
              "busy": 'pipeline = "text-embedding"\nqueue_limit = 8',      # 16 in flight at most
              "cls": 'pipeline = "text-classification"\n' + labels,
              "tok": 'pipeline = "token-classification"\n' + labels,
              "pics": 'pipeline = "image-embedding"\nbackbone = "vision"',
              "co2": 'pipeline = "time-series-forecasting"\nbackbone = "series"'}
    keys = os.path.join(specs, "keys.toml")
    with open(keys, "w") as f:
        f.write(f'[keys]\n"{KEY_ROOT}" = 0\n"{KEY_NOBODY}" = {NOBODY}\n')
    os.chmod(keys, 0o600)
    procs, gw = [], None
    try:
        procs = [TaskProc(write_spec(specs, n, b), d.run_dir).start() for n, b in bodies.items()]
        with d.client() as c:                       # another tenant's task (no process needed)
            c.control(Register(ref=c.ref(), proto=PROTOCOL_VERSION, extension=ExtensionSpec(),
                               task=TaskConfig(name="bobs", owner_uid=NOBODY)))
        gw = GatewayProc(d.run_dir, "--api-keys", keys, "--max-body-mb", "1").start()
        yield d, gw, specs
    finally:
        if gw is not None:
            gw.stop()
        for p in procs:
            p.stop()
        d.cleanup()


def oa(gw, key=KEY_ROOT) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=WAIT_S)


def aoa(gw, key=KEY_ROOT) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=WAIT_S)


def post(gw, path: str, key: str | None = KEY_ROOT, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + path, headers={**headers, **kw.pop("headers", {})},
                      timeout=WAIT_S, **kw)


def info(d):
    with d.client() as c:
        return {b.name: b for b in c.control(Info(ref=c.ref())).load}


def wait_for(cond, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# ------------------------------------------------------------------ models and keys

def test_each_key_lists_only_its_owners_tasks(world):
    d, gw, _ = world
    mine = oa(gw).models.list()
    assert sorted(m.id for m in mine.data) == ["busy", "chat", "cls", "co2", "emb", "pics", "tok"]
    chat = next(m for m in mine.data if m.id == "chat")
    assert chat.owned_by == "root" and chat.model_extra["fmplex"]["family"] == "decoder"
    assert [m.id for m in oa(gw, KEY_NOBODY).models.list().data] == ["bobs"]
    assert oa(gw).models.retrieve("emb").id == "emb"
    with pytest.raises(openai.NotFoundError):
        oa(gw, KEY_NOBODY).models.retrieve("emb")                 # another owner's: not found
    for key in ("sk-not-a-key-of-this-gateway", KEY_ROOT[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            oa(gw, key).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(gw.url + "/models", timeout=WAIT_S)            # no Authorization at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------ generation

def test_chat_completions_sync_and_streaming_equal_fmplex(world):
    d, gw, _ = world
    with d.client() as c:
        want = c.generate("chat", messages=CHAT, max_tokens=12)
        raw = c.generate("chat", prompt="Once upon a time", max_tokens=10)
    client = oa(gw)
    r = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12,
                                       temperature=0)
    assert r.object == "chat.completion" and r.model == "chat"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (want.prompt_tokens, 12, want.prompt_tokens + 12)
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({ch.id for ch in chunks}) == 1
    comp = client.completions.create(model="chat", prompt="Once upon a time", max_tokens=10)
    assert comp.object == "text_completion" and comp.choices[0].text == raw.text
    parts = list(client.completions.create(model="chat", prompt="Once upon a time",
                                           max_tokens=10, stream=True))
    assert "".join(p.choices[0].text for p in parts) == raw.text
    assert parts[-1].choices[0].finish_reason == "length"


def test_sampling_fields_seed_and_stop(world):
    d, gw, _ = world
    client = oa(gw)
    seeded = [client.chat.completions.create(model="chat", messages=CHAT, max_tokens=8,
                                             temperature=1.0, top_p=0.9, seed=42)
              .choices[0].message.content for _ in range(2)]
    with d.client() as c:
        want = c.generate("chat", messages=CHAT, max_tokens=8, temperature=1.0, top_p=0.9,
                          seed=42)
    assert seeded == [want.text, want.text]
    full = client.completions.create(model="chat", prompt="Hello", max_tokens=12).choices[0]
    stop = full.text[3:6]
    cut = client.completions.create(model="chat", prompt="Hello", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.text[:full.text.index(stop)]
    extra = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=20,
                                           extra_body={"ignore_eos": True, "top_k": 5})
    assert extra.usage.completion_tokens == 20


def test_async_client_concurrent_and_streaming(world):
    d, gw, _ = world
    prompts = [f"Tell me about the number {i}" for i in range(4)]
    with d.client() as c:
        want = [c.generate("chat", messages=[{"role": "user", "content": p}], max_tokens=10).text
                for p in prompts]

    async def main():
        async with aoa(gw) as client:
            replies = await asyncio.gather(*(client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": p}], max_tokens=10)
                for p in prompts))
            stream = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": prompts[0]}], max_tokens=10,
                stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            emb = await client.embeddings.create(model="emb", input="async embedding")
            return [r.choices[0].message.content for r in replies], text, emb
    got, streamed, emb = asyncio.run(main())
    assert got == want and streamed == want[0]
    assert len(emb.data) == 1 and len(emb.data[0].embedding) == HIDDEN


# ------------------------------------------------------------------ one-forward tasks

def test_embeddings_base64_and_float_equal_fmplex(world):
    d, gw, _ = world
    texts = ["the first sentence", "and a second, longer one"]
    with d.client() as c:
        want = c.infer("emb", texts)
    client = oa(gw)
    b64 = client.embeddings.create(model="emb", input=texts)       # the client asks for base64
    floats = client.embeddings.create(model="emb", input=texts, encoding_format="float")
    one = client.embeddings.create(model="emb", input=texts[0])
    for r in (b64, floats):
        assert [e.index for e in r.data] == [0, 1]
        assert np.allclose(np.array([e.embedding for e in r.data]), want.embeddings, atol=1e-6)
        assert r.usage.prompt_tokens == want.prompt_tokens > 0
    assert np.allclose(one.data[0].embedding, want.embeddings[0], atol=1e-6)
    raw = post(gw, "/embeddings", json={"model": "emb", "input": texts[:1],
                                        "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.allclose(vec, want.embeddings[0], atol=1e-6)


def test_fmplex_paths_for_other_task_kinds(world):
    d, gw, _ = world
    with d.client() as c:
        labels = c.infer("cls", ["is this a"], top_k=2)
        tokens = c.infer("tok", ["Paris is nice"])
        image = _png(3)
        pics = c.infer_images("pics", [image])
        co2 = c.infer_series("co2", np.sin(np.arange(64) / 4.0) + 3.0, horizon=8)
    r = post(gw, "/fmplex/classifications", json={"model": "cls", "input": "is this a",
                                                  "top_k": 2}).json()
    assert [(x["label"], round(x["score"], 5)) for x in r["data"][0]["labels"]] == \
        [(x.label, round(x.score, 5)) for x in labels.labels[0]]
    r = post(gw, "/fmplex/classifications", json={"model": "tok", "input": ["Paris is nice"]})
    toks = r.json()["data"][0]["tokens"]
    assert [(t["start"], t["end"], t["label"]) for t in toks] == \
        [(t.start, t.end, t.label) for t in tokens.tokens[0]]
    assert toks[0]["text"] == "Paris"[toks[0]["start"]:toks[0]["end"]] or toks[0]["text"]
    r = post(gw, "/fmplex/images", json={"model": "pics", "images": [
        "data:image/png;base64," + base64.b64encode(image).decode()]}).json()
    assert np.allclose(r["data"][0]["embedding"], pics.embeddings[0], atol=1e-5)
    series = (np.sin(np.arange(64) / 4.0) + 3.0).tolist()
    r = post(gw, "/fmplex/forecasts", json={"model": "co2", "series": series, "horizon": 8}).json()
    assert r["quantiles"] == co2.quantiles
    assert np.allclose(r["data"][0]["forecast"], co2.forecast[0], atol=1e-4)
    wrong = post(gw, "/embeddings", json={"model": "cls", "input": "x"})
    assert wrong.status_code == 400 and "/v1/fmplex/classifications" in wrong.json()["error"]["message"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ errors

def test_errors_have_openais_shape_and_status(world):
    d, gw, _ = world
    client = oa(gw)
    for model in ("no-such-task", "bobs"):                      # unknown, or another owner's
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=CHAT)
        assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):                   # its owner does reach it ...
        oa(gw, KEY_NOBODY).embeddings.create(model="emb", input="x")
    for bad, param in ((dict(model="emb", messages=CHAT), "model"),     # not a generation task
                       (dict(model="chat", messages=CHAT, n=2), "n"),
                       (dict(model="chat", messages=CHAT, max_tokens=0), "max_tokens"),
                       (dict(model="chat", messages=CHAT, presence_penalty=0.5),
                        "presence_penalty"),
                       (dict(model="chat", messages=[{"role": "robot", "content": "x"}]),
                        "messages"),
                       (dict(model="chat", messages=CHAT, seed=-1), "seed")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**bad)
        assert e.value.status_code == 400 and e.value.body["param"] == param, bad
    with pytest.raises(openai.BadRequestError) as e:            # refused by the task itself
        client.completions.create(model="chat", prompt="word " * 600)
    assert e.value.body["code"] == "oversized"
    for body, what in ((b"{not json", "could not parse"), (b"[1, 2]", "must be an object"),
                       (b"\xff\xfe", "could not parse")):
        r = post(gw, "/chat/completions", content=body,
                 headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
    big = {"model": "emb", "input": "x" * (1 << 20)}            # over --max-body-mb 1
    r = post(gw, "/embeddings", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = post(gw, "/embeddings", content=(json.dumps(big).encode()[i:i + 65536]
                                         for i in range(0, 1 << 21, 65536)))   # chunked
    assert r.status_code == 413
    r = httpx.get(gw.url + "/chat/completions", timeout=WAIT_S)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(gw.url + "/nothing", timeout=WAIT_S).json()["error"]["message"]
    r = oa(gw).chat.completions.create(model="chat", messages=CHAT, max_tokens=3)
    assert r.usage.completion_tokens == 3                        # and nothing else was lost


def test_overload_is_429_with_retry_after_and_a_missed_deadline_504(world):
    """The daemon is stopped (SIGSTOP) for a moment: the task takes 16 requests in flight and
    refuses the rest at once (overloaded, in the task); after SIGCONT the 16 reach the daemon at
    once, whose queue takes 8 (queue_limit) and refuses what does not fit (overloaded, in the
    daemon). Every refusal is a 429 with Retry-After; nothing else fails. A request with a 300 ms
    deadline meanwhile times out in the task: 504."""
    d, gw, _ = world
    oa(gw).embeddings.create(model="busy", input="warm")         # resolved and listed before

    async def main():
        async with aoa(gw) as client:
            calls = [asyncio.ensure_future(client.embeddings.create(
                model="busy", input=f"request {i}")) for i in range(40)]
            refused = []
            deadline = time.monotonic() + WAIT_S
            while len(refused) < 24 and time.monotonic() < deadline:
                done, _ = await asyncio.wait(calls, timeout=1, return_when=asyncio.FIRST_COMPLETED)
                refused = [c for c in calls if c.done()]
                calls_left = [c for c in calls if not c.done()]
                if not calls_left:
                    break
            late = await asyncio.gather(client.embeddings.create(
                model="emb", input="late", extra_body={"timeout_ms": 300}),
                return_exceptions=True)
            os.kill(d.proc.pid, signal.SIGCONT)
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results, late[0]
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        results, late = asyncio.run(main())
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(limited) >= 24 and len(served) >= 8 and len(limited) + len(served) == 40, results
    assert all(r.response.headers["retry-after"] == "1" for r in limited)
    assert {r.body["code"] for r in limited} == {"overloaded"}
    assert isinstance(late, openai.APIStatusError) and late.status_code == 504, late
    assert late.body["code"] == "timeout"


def test_a_client_that_disconnects_cancels_its_generation(world):
    d, gw, _ = world
    with d.client() as c:
        before = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}["chat"]
    stream = oa(gw).chat.completions.create(model="chat", messages=CHAT, max_tokens=480,
                                            stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()                                               # the client goes away
    gw.wait_for(b"client of chat went away mid-stream", WAIT_S)
    wait_for(lambda: info(d)["llama"].sequences == 0 and info(d)["llama"].kv_blocks_used == 0)
    with d.client() as c:
        after = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}["chat"]
    generated = (after.served_tokens - before.served_tokens - 40) / 2    # prompt < 40 tokens
    assert generated < 300, (before.served_tokens, after.served_tokens)  # far from 480

    async def not_streaming():                                   # the same without streaming
        async with httpx.AsyncClient(timeout=WAIT_S) as h:
            call = asyncio.ensure_future(h.post(
                gw.url + "/chat/completions", headers={"Authorization": f"Bearer {KEY_ROOT}"},
                json={"model": "chat", "messages": CHAT, "max_tokens": 480, "ignore_eos": True}))
            await asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: info(d)["llama"].sequences == 1)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
    asyncio.run(not_streaming())
    gw.wait_for(b"client of chat went away; its request was cancelled", WAIT_S)
    wait_for(lambda: info(d)["llama"].sequences == 0 and info(d)["llama"].kv_blocks_used == 0)
    r = oa(gw).chat.completions.create(model="chat", messages=CHAT, max_tokens=4)
    assert r.usage.completion_tokens == 4


# ------------------------------------------------------------------ listening

def test_without_keys_it_listens_only_on_loopback(world):
    d, _, specs = world
    out = subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", d.run_dir, "gateway",
                          "--listen", "0.0.0.0:0"], cwd=REPO, capture_output=True, text=True,
                         timeout=WAIT_S)
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0 without --api-keys" in out.stderr
    loose = os.path.join(specs, "loose.toml")
    with open(loose, "w") as f:
        f.write(f'[keys]\n"{KEY_ROOT}" = 0\n')
    os.chmod(loose, 0o644)
    out = subprocess.run([sys.executable, "-m", "fmplex", "--run-dir", d.run_dir, "gateway",
                          "--api-keys", loose], cwd=REPO, capture_output=True, text=True,
                         timeout=WAIT_S)
    assert out.returncode == 2 and "chmod 600" in out.stderr
    gw = GatewayProc(d.run_dir).start()                          # loopback, no keys: our uid
    try:
        assert "no API keys: loopback only" in gw.output.decode()
        models = oa(gw, "anything").models.list()
        assert {m.id for m in models.data} == {"busy", "chat", "cls", "co2", "emb", "pics", "tok"}
        assert next(m for m in models.data if m.id == "emb").model_extra["fmplex"]["family"] == \
            Family.TEXT_ENCODER.value
    finally:
        assert gw.stop() == 0

"""Text generation end to end: a real fmplexd hosting a tiny random Llama (SmolLM2's tokenizer and
chat template) next to a tiny BERT, real generation task processes, the client, the CLI, streaming,
cancellation, stop strings, KV exhaustion, and bad input that leaves other streams untouched."""
import asyncio
import json
import os
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import zmq
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from fmplex import AsyncClient
from ipc import aio, codec
from ipc.errors import ErrorCode, FmplexError, InvalidRequest, ProtocolError
from ipc.messages import (PROTOCOL_VERSION, CancelRequest, Deploy, FinishReason, GenerateReply,
                          GenerateText, Info, TextDelta)
from testkit.launch import REPO, Daemon, TaskProc, short_tmpdir, write_spec
from testkit.tiny import write_random_lora

GEN = 'pipeline = "text-generation"\nbackbone = "llama"\n'
SLACK = "heartbeat_ms = 200\nliveness_ms = 5000\nkv_pool_mb = 4"


@pytest.fixture(scope="module")
def env(tiny_llama, tiny_bert):
    d = Daemon({"llama": tiny_llama, "bert": tiny_bert}, config=SLACK).start()
    specs = short_tmpdir("fmx-gen-")
    paths = {"gen": write_spec(specs, "gen", GEN + "[generation]\nmax_tokens = 12"),
             "other": write_spec(specs, "other", GEN),
             "sys": write_spec(specs, "sys", GEN + 'system_prompt = "You answer in one word."')}
    procs = [TaskProc(p, d.run_dir).start() for p in paths.values()]
    try:
        yield d, specs, tiny_llama
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


def render(model_dir: str, chat: list[dict]) -> str:
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=chat, add_generation_prompt=True)


def test_generate_stream_and_chat(env):
    d, _, model_dir = env
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with d.client() as c:
        r = c.generate("gen", prompt="Hello there")
        assert r.finish_reason is FinishReason.LENGTH and r.completion_tokens == 12
        assert len(r.token_ids) == 12 and r.prompt_tokens == len(tok.encode("Hello there").ids)
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True) and r.task == "gen"
        parts = list(c.stream("gen", prompt="Hello there", max_tokens=12))
        assert all(isinstance(p, TextDelta) for p in parts[:-1]) and len(parts) >= 2
        final = parts[-1]
        assert isinstance(final, GenerateReply) and final.token_ids == r.token_ids
        assert "".join(p.text for p in parts[:-1]) == final.text == r.text
        chat = [{"role": "user", "content": "What is 2+2?"}]
        rc = c.generate("gen", messages=chat, max_tokens=3)
        assert rc.prompt_tokens == len(tok.encode(render(model_dir, chat),
                                                  add_special_tokens=False).ids)
        with_system = [{"role": "system", "content": "You answer in one word."}] + chat
        rs = c.generate("sys", messages=chat, max_tokens=3)     # the spec's system prompt
        assert rs.prompt_tokens == len(tok.encode(render(model_dir, with_system),
                                                  add_special_tokens=False).ids)
        special = c.generate("gen", prompt="<|im_start|>user\nhi<|im_end|>\n", max_tokens=2)
        assert special.prompt_tokens == len(tok.encode("<|im_start|>user\nhi<|im_end|>\n",
                                                       add_special_tokens=False).ids) == 6
        seeded = [c.generate("gen", prompt="Hello", temperature=1.0, seed=7).token_ids
                  for _ in range(2)]
        assert seeded[0] == seeded[1]


def test_cli_generate_streams_and_prints_json(env):
    d, _, _ = env
    base = [sys.executable, "-m", "fmplex", "--run-dir", d.run_dir, "generate", "gen", "Hello"]
    out = subprocess.run(base + ["--json", "--max-tokens", "5"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert set(got) == {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert got["completion_tokens"] == len(got["token_ids"]) == 5 and got["finish_reason"] == "length"
    streamed = subprocess.run(base + ["--max-tokens", "5"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert streamed.returncode == 0 and streamed.stdout == got["text"]
    assert "[length: 5 tokens]" in streamed.stderr
    chat = subprocess.run(base + ["--chat", "--json", "--max-tokens", "2", "--seed", "3",
                                  "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20",
                                  "--stop", "zzz"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert chat.returncode == 0 and json.loads(chat.stdout)["prompt_tokens"] > 6


def test_stop_strings_and_stop_token_ids(env):
    d, _, _ = env
    with d.client() as c:
        full = c.generate("gen", prompt="Once upon a time", max_tokens=12)
        assert len(full.text) > 8
        stop = full.text[4:7]
        cut = c.generate("gen", prompt="Once upon a time", max_tokens=12, stop=[stop])
        assert cut.finish_reason is FinishReason.STOP
        assert cut.text == full.text[:full.text.find(stop)] and stop not in cut.text
        parts = list(c.stream("gen", prompt="Once upon a time", max_tokens=12, stop=[stop]))
        assert "".join(p.text for p in parts[:-1]) == cut.text       # nothing of the stop streamed
        by_id = c.generate("gen", prompt="Once upon a time", max_tokens=12,
                           stop_token_ids=[full.token_ids[2]])
        first = full.token_ids.index(full.token_ids[2])
        assert by_id.finish_reason is FinishReason.STOP
        assert by_id.token_ids == full.token_ids[:first + 1]


def _info(d):
    with d.client() as c:
        info = c.control(Info(ref=c.ref()))
    return {s.name: s for s in info.load}["llama"]


def _wait(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_cancel_and_a_vanished_client_free_kv_and_leave_others_untouched(env):
    d, _, _ = env
    with d.client() as c:
        alone = c.generate("other", prompt="A quiet neighbour", max_tokens=60, ignore_eos=True)
        address = c.endpoint("gen").address

    async def scenario():
        async with AsyncClient(d.run_dir, timeout_s=60) as ac:
            other = asyncio.ensure_future(ac.generate("other", prompt="A quiet neighbour",
                                                      max_tokens=60, ignore_eos=True))
            stream = ac.stream("gen", prompt="Cancel me", max_tokens=400, ignore_eos=True)
            first = await stream.__anext__()                 # generating now
            assert isinstance(first, TextDelta)
            await stream.aclose()                            # leaving early sends CancelRequest
            freed = await asyncio.get_running_loop().run_in_executor(
                None, _wait, lambda: _info(d).sequences <= 1)
            return first, freed, await other
    first, freed, other = aio.run(scenario())
    assert freed and other.token_ids == alone.token_ids         # the neighbour is untouched

    ctx = zmq.Context()                                          # explicit cancel on the wire
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send_multipart(codec.encode(GenerateText(ref=9, prompt="x", max_tokens=400,
                                                      stream=True, ignore_eos=True)))
        assert sock.poll(30_000)
        assert codec.decode(sock.recv_multipart()).TYPE == "text_delta"
        sock.send_multipart(codec.encode(CancelRequest(ref=9)))
        replies = []
        while not replies or replies[-1].TYPE != "generate_reply":
            assert sock.poll(30_000)
            replies.append(codec.decode(sock.recv_multipart()))
        assert any(r.TYPE == "ok" and r.ref == 9 for r in replies)
        assert replies[-1].finish_reason is FinishReason.CANCELLED
        assert replies[-1].completion_tokens < 400
        sock.send_multipart(codec.encode(GenerateText(ref=10, prompt="y", max_tokens=400,
                                                      stream=True, ignore_eos=True)))
        assert sock.poll(30_000)
        sock.recv_multipart()
    finally:
        sock.close(linger=0)                                     # the client vanishes mid-stream
        ctx.term()
    assert _wait(lambda: _info(d).sequences == 0 and _info(d).kv_blocks_used == 0)
    with d.client() as c:
        assert c.generate("other", prompt="A quiet neighbour", max_tokens=60,
                          ignore_eos=True).token_ids == alone.token_ids


def test_kv_pool_exhaustion_preempts_recomputes_and_finishes_everything(tiny_llama):
    """A pool of 6 blocks (96 tokens) and four sequences that each need 5: they cannot all hold
    their KV at once, so some are preempted and recomputed; every one ends as it would alone."""
    d = Daemon({"llama": tiny_llama}, config="kv_pool_mb = 0.0235\nkv_block_tokens = 16").start()
    specs = short_tmpdir("fmx-kv-")
    proc = TaskProc(write_spec(specs, "g", GEN), d.run_dir).start()
    try:
        info = _info(d)
        assert info.kv_blocks_total == 6 and info.kv_block_tokens == 16
        prompts = [f"Sequence number {i} says hello to the pool" for i in range(4)]
        with d.client() as c:
            alone = [c.generate("g", prompt=p, max_tokens=60, ignore_eos=True).token_ids
                     for p in prompts]

        async def together():
            async with AsyncClient(d.run_dir, timeout_s=120) as ac:
                return await asyncio.gather(*(ac.generate("g", prompt=p, max_tokens=60,
                                                          ignore_eos=True) for p in prompts))
        replies = aio.run(together())
        assert [r.token_ids for r in replies] == alone
        assert all(r.finish_reason is FinishReason.LENGTH for r in replies)
        after = _info(d)
        assert after.preemptions > 0 and after.kv_blocks_used == 0
    finally:
        proc.stop()
        d.cleanup()


def test_bad_input_gets_typed_errors_and_other_streams_go_on(env):
    d, specs, _ = env
    with d.client() as c:
        alone = c.generate("other", prompt="Keep going", max_tokens=40, ignore_eos=True)

    async def neighbour():
        async with AsyncClient(d.run_dir, timeout_s=60) as ac:
            return await ac.generate("other", prompt="Keep going", max_tokens=40, ignore_eos=True)

    loop_result = {}
    import threading
    t = threading.Thread(target=lambda: loop_result.setdefault("r", aio.run(neighbour())))
    t.start()
    with d.client() as c:
        for bad, code in ((dict(max_tokens=0), ErrorCode.BAD_MESSAGE),
                          (dict(stop=[""]), ErrorCode.BAD_MESSAGE),
                          (dict(stop=[f"s{i}" for i in range(17)]), ErrorCode.BAD_MESSAGE),
                          (dict(prompt="word " * 600), ErrorCode.OVERSIZED)):
            kwargs = {"prompt": "hi", **bad}
            with pytest.raises(FmplexError) as e:
                c.generate("gen", **kwargs)
            assert e.value.code is code, (bad, e.value)
        with pytest.raises(InvalidRequest, match="either `prompt` or `messages`"):
            c.generate("gen")
        for name, body, match in (
                ("nobb", 'pipeline = "text-generation"\nbackbone = "nope"',
                 "no backbone 'nope'"),
                ("wrongfam", 'pipeline = "text-generation"\nbackbone = "bert"',
                 "needs a decoder backbone; bert is a text-encoder backbone"),
                ("wrongfam2", 'pipeline = "text-embedding"\nbackbone = "llama"',
                 "needs a text-encoder backbone; llama is a decoder backbone")):
            path = write_spec(specs, name, body)
            with open(path) as f, pytest.raises(FmplexError, match=match):
                c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
        bert_lora = write_random_lora(os.path.join(specs, "bert-lora"), 4, [0], 32, seed=1)
        path = write_spec(specs, "alien", GEN + '[extension]\nadapter = "bert-lora"')
        with open(path) as f, pytest.raises(FmplexError, match="targets no module of this backbone"
                                                                r".*self_attn\.q_proj"):
            c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
        bad_rank = os.path.join(specs, "bad-shape")
        os.makedirs(bad_rank, exist_ok=True)
        key = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{key}.lora_A.weight": np.zeros((4, 31), np.float32),
                   f"{key}.lora_B.weight": np.zeros((32, 4), np.float32)},
                  os.path.join(bad_rank, "adapter_model.safetensors"))
        with open(os.path.join(bad_rank, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, f)
        path = write_spec(specs, "shape", GEN + '[extension]\nadapter = "bad-shape"')
        with open(path) as f, pytest.raises(FmplexError, match=r"lora\.0\.q_proj\.A .*shape "
                                                                r"\(4, 31\).*needs \(4, 32\)"):
            c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path), timeout_s=120)
    t.join(120)
    assert loop_result["r"].token_ids == alone.token_ids


def test_malformed_generate_frames_get_typed_errors(env):
    d, _, _ = env
    with d.client() as c:
        address = c.endpoint("gen").address
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    try:
        for header, code in (({"type": "generate_text", "ref": 3, "prompt": "x",
                               "stop": "not a list"}, "bad_message"),
                             ({"type": "generate_text", "ref": 4, "prompt": "x",
                               "messages": [{"role": "user"}]}, "bad_message"),
                             ({"type": "generate_text", "ref": 5, "prompt": "x",
                               "proto": PROTOCOL_VERSION + 1}, "version_mismatch")):
            sock.send_multipart([msgpack.packb(header)])
            assert sock.poll(20_000)
            reply = codec.decode(sock.recv_multipart())
            assert (reply.TYPE, reply.ref, reply.code.value) == ("error", header["ref"], code)
    finally:
        sock.close(linger=0)
        ctx.term()
    with pytest.raises(ProtocolError):
        with d.client() as c:
            c.generate("gen", prompt="x", top_p=2.0)

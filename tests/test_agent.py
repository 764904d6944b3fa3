"""The host agent (cluster/agent.py) against a real fmplexd, without Ray: it deploys cluster tasks
with tcp:// + CURVE endpoints from its port range, reports them (and only them) with their keys,
and removes them. Plus the host spec it writes (cluster/specs.py)."""
from __future__ import annotations

import os
import shutil
import time
import tomllib

import pytest
import zmq

from cluster.agent import AgentError, HostAgent
from cluster.specs import host_spec
from ipc import transport
from ipc.messages import PROTOCOL_VERSION, Deploy, Infer, InferReply, ListTasks, TaskState
from ipc.spec import parse_spec
from testkit.launch import Daemon, short_tmpdir, write_spec
from testkit.tiny import write_random_lora

PORTS = (23500, 23599)


@pytest.fixture(scope="module")
def host(tiny_bert):
    d = Daemon(tiny_bert, threads=1).start()
    work = short_tmpdir("fmx-agent-")
    public, secret = (k.decode() for k in zmq.curve_keypair())
    write_random_lora(os.path.join(work, "lora"), 4, [0, 1], 32, seed=1, std=0.1)
    spec = write_spec(work, "a1", f'pipeline = "text-embedding"\n[extension]\nadapter = "lora"\n'
                                  f'[endpoint]\nauthorized_keys = ["{public}"]')
    agent = HostAgent("h0", d.run_dir, os.path.join(work, "agent"), "127.0.0.1", ports=PORTS)
    try:
        yield d, agent, work, spec, (public, secret)
    finally:
        d.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def call(address: str, server_key: str, keys: tuple[str, str]) -> InferReply:
    ctx = zmq.Context()
    sock = transport.dealer(ctx, address, curve=(server_key.encode(), keys[0].encode(),
                                                 keys[1].encode()))
    try:
        return transport.request(sock, Infer(ref=1, texts=["hello world"], proto=PROTOCOL_VERSION),
                                 30)
    finally:
        sock.close(linger=0)
        ctx.term()


def test_it_deploys_reports_serves_and_removes_its_tasks(host):
    d, agent, work, spec, keys = host
    first = agent.report()
    assert first.host == "h0" and first.replicas == () and first.memory_bytes > 0
    assert [b for b, _ in first.backbones] == ["default"]
    with open(spec) as f:
        text = f.read()
    tcp = agent.deploy("a1", text, work)
    port = int(tcp.rsplit(":", 1)[1])
    assert tcp.startswith("tcp://127.0.0.1:") and PORTS[0] <= port <= PORTS[1]
    rep = agent.report().replica("a1")
    assert rep.state is TaskState.READY and rep.serving and rep.address == tcp
    reply = call(rep.address, rep.server_key, keys)           # the task itself, over CURVE
    assert isinstance(reply, InferReply) and reply.embeddings.shape == (1, 32)
    assert agent.deploy("a1", text, work) == tcp               # again: the same, no conflict
    with d.client() as c:                                      # someone else's task: not ours
        other = write_spec(work, "local", 'pipeline = "text-embedding"')
        with open(other) as f:
            c.control(Deploy(ref=1, spec=f.read(), spec_path=other), timeout_s=120)
    assert [r.task for r in agent.report().replicas] == ["a1"]
    assert agent.remove("a1") is True
    assert agent.report().replicas == ()
    assert agent.remove("a1") is False
    with d.client() as c:
        assert "a1" not in {t.name for t in c.control(ListTasks(ref=1)).tasks}


def test_its_rate_follows_the_last_seconds_of_requests(host):
    d, agent, work, spec, keys = host
    with open(spec) as f:
        agent.deploy("a1", f.read(), work)
    rep = agent.report().replica("a1")
    deadline = time.monotonic() + 30
    while agent.report().replica("a1").rate == 0:              # requests, then a measured rate
        call(rep.address, rep.server_key, keys)
        assert time.monotonic() < deadline
    agent.remove("a1")


def test_a_bad_spec_or_a_full_port_range_is_an_agent_error(host):
    d, agent, work, spec, keys = host
    with pytest.raises(AgentError, match="invalid_input"):
        agent.deploy("bad", 'name = "bad"\npipeline = "no-such-pipeline"\n', work)
    full = HostAgent("h1", d.run_dir, os.path.join(work, "agent-full"), "127.0.0.1",
                     ports=(PORTS[0], PORTS[0] - 1))
    with pytest.raises(AgentError, match="no free port"):
        with open(spec) as f:
            full.deploy("x", f.read(), work)


def test_the_host_spec_sets_the_endpoint_and_absolute_paths():
    text = ('name = "t"\npipeline = "text-classification"\nlabels = ["nég", "say \\"hi\\""]\n'
            'weight = 2.5\n[extension]\nhead = "heads/h.safetensors"\nadapter = "/abs/lora"\n'
            '[endpoint]\nauthorized_keys = ["' + "k" * 40 + '"]\n')
    out = host_spec(text, "/srv/specs", "tcp://10.0.0.5:20001")
    data = tomllib.loads(out)
    assert data["endpoint"] == {"authorized_keys": ["k" * 40], "tcp": "tcp://10.0.0.5:20001"}
    assert data["extension"] == {"head": "/srv/specs/heads/h.safetensors", "adapter": "/abs/lora"}
    assert data["labels"] == ["nég", 'say "hi"'] and data["weight"] == 2.5
    assert parse_spec(out).tcp == "tcp://10.0.0.5:20001"

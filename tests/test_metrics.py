"""fmplexd's Prometheus endpoint (fmplexd/metrics.py) on a real daemon (tiny BERT + tiny Llama) with
real task processes: scraped over HTTP and parsed with prometheus-client's own parser, every
series equals the daemon's own figures (TaskStats, BackboneStats, regions); errors are counted by
code, latencies and batches in histograms, cache hits as the task reports them. When a
`prometheus` server binary is installed (Debian: apt-get install prometheus), it scrapes the
daemon and a series is read back through its HTTP API."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipc.addresses import parse_listen
from ipc.errors import InvalidRequest
from ipc.messages import Info, ListTasks
from testkit.launch import Daemon, TaskProc, short_tmpdir, write_spec

WAIT_S = 60


@pytest.fixture(scope="module")
def env(tiny_bert, tiny_llama):
    d = Daemon({"default": tiny_bert, "llama": tiny_llama},
               config="liveness_ms = 5000\nkv_pool_mb = 4").start()
    specs = short_tmpdir("fmx-metrics-")
    procs = []
    try:
        for name, body in (("emb", 'pipeline = "text-embedding"\ncache_mb = 1'),
                           ("gen", 'pipeline = "text-generation"\nbackbone = "llama"\n'
                                   '[generation]\nmax_tokens = 6')):
            procs.append(TaskProc(write_spec(specs, name, body), d.run_dir).start())
        yield d
    finally:
        for p in procs:
            p.stop()
        d.cleanup()


def scrape(url: str) -> tuple[dict, str]:
    """{(sample name, frozenset(labels)): value} of one scrape, and its Content-Type."""
    with urllib.request.urlopen(url, timeout=WAIT_S) as r:
        text, ctype = r.read().decode(), r.headers["Content-Type"]
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, ctype


def series(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_for(cond, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not (got := cond()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
    return got


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9740") == ("127.0.0.1", 9740)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9740", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_scraped_series_equal_the_daemons_figures(env):
    d = env
    with d.client() as c:
        c.infer("emb", ["counted once"])
        c.infer("emb", ["counted once"])                    # a cache hit: not the daemon's
        c.infer("emb", ["another one", "and two"])
        c.generate("gen", prompt="Hello")
        with pytest.raises(InvalidRequest, match="top_p"):
            c.generate("gen", prompt="Hello", top_p=0.0)      # refused by the daemon
        wait_for(lambda: {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}[
            "emb"].cache_hits == 1)
        info = c.control(Info(ref=c.ref()))
        tasks = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}
    assert info.metrics.startswith("http://127.0.0.1:") and info.metrics.endswith("/metrics")
    m, ctype = scrape(info.metrics)
    assert ctype.startswith("text/plain")
    for name, t in tasks.items():
        lab = {"task": name, "backbone": t.backbone}
        assert series(m, "fmplex_task_requests_total", **lab) == t.requests
        assert series(m, "fmplex_task_queue_depth", **lab) == t.queued == 0
        assert series(m, "fmplex_task_tokens_served_total", **lab) == t.served_tokens > 0
        assert series(m, "fmplex_task_restarts_total", **lab) == t.restarts == 0
        assert series(m, "fmplex_task_cache_hits_total", **lab) == t.cache_hits
        assert series(m, "fmplex_task_ready", **lab) == 1
        assert series(m, "fmplex_task_latency_seconds_count", **lab) == t.requests
        assert series(m, "fmplex_task_latency_seconds_bucket", **lab, le="+Inf") == t.requests
        assert 0 < series(m, "fmplex_task_latency_seconds_sum", **lab) < WAIT_S
    assert tasks["emb"].requests == 2 and tasks["emb"].cache_hits == 1 and tasks["gen"].requests == 1
    assert series(m, "fmplex_task_cache_bytes", task="emb", backbone="default") > 0
    assert series(m, "fmplex_task_errors_total", task="gen", backbone="llama",
                  code="invalid_input") == 1
    assert ("fmplex_task_errors_total", frozenset({"task": "emb", "backbone": "default",
                                                   "code": "invalid_input"}.items())) not in m
    regions = {r.name: r.bytes for r in info.regions}
    for b in info.load:
        lab = {"backbone": b.name}
        assert series(m, "fmplex_backbone_batches_total", **lab) == b.batches > 0
        assert series(m, "fmplex_backbone_batch_tokens_count", **lab) == b.batches
        assert series(m, "fmplex_backbone_forward_seconds_count", **lab) == b.batches
        assert series(m, "fmplex_backbone_kv_blocks_total", **lab) == b.kv_blocks_total
        assert series(m, "fmplex_backbone_kv_blocks_used", **lab) == b.kv_blocks_used == 0
        assert series(m, "fmplex_backbone_region_bytes", **lab) == regions[f"backbone:{b.name}"]
    assert series(m, "fmplex_backbone_kv_blocks_total", backbone="llama") > 0
    assert series(m, "fmplex_daemon_tasks") == len(tasks)
    again, _ = scrape(info.metrics)                          # no traffic: the same counters
    assert series(again, "fmplex_task_requests_total", task="emb", backbone="default") == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus server binary (Debian: apt-get install prometheus)")
def test_a_prometheus_server_scrapes_the_daemon(env):
    d = env
    with d.client() as c:
        c.infer("emb", ["for prometheus"])
        url = urllib.parse.urlparse(c.control(Info(ref=c.ref())).metrics)
        want = {t.name: t for t in c.control(ListTasks(ref=c.ref())).tasks}["emb"].requests
    work = short_tmpdir("fmx-prom-")
    with open(os.path.join(work, "prometheus.yml"), "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                f"scrape_configs:\n  - job_name: fmplexd\n    static_configs:\n"
                f"      - targets: ['{url.netloc}']\n")
    web = f"127.0.0.1:{free_port()}"
    log = open(os.path.join(work, "prometheus.log"), "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={work}/prometheus.yml",
                             f"--storage.tsdb.path={work}/data", f"--web.listen-address={web}"],
                            stdout=log, stderr=subprocess.STDOUT)
    query = urllib.parse.urlencode({"query": 'fmplex_task_requests_total{task="emb"}'})

    def answered():
        assert proc.poll() is None, open(log.name).read()[-3000:]
        try:
            got = get_json(f"http://{web}/api/v1/query?{query}")
        except OSError:
            return None                       # not listening yet
        result = got["data"]["result"]
        return result if result else None
    try:
        result = wait_for(answered, 90)
        assert result[0]["metric"]["job"] == "fmplexd"
        assert result[0]["metric"]["backbone"] == "default"
        assert float(result[0]["value"][1]) == want
        up = get_json(f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": "up"}))
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def test_the_grafana_dashboard_queries_only_served_series(env):
    """packaging/grafana-fmplex.json is valid JSON and every fmplex_* series it queries is one
    the daemon serves."""
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "packaging",
                           "grafana-fmplex.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    wanted = {m for e in exprs for m in re.findall(r"fmplex_[a-z_]+", e)}
    with env.client() as c:
        with pytest.raises(InvalidRequest):
            c.generate("gen", prompt="x", top_p=0.0)          # so that an error series exists
        c.infer("emb", ["so that a latency series exists"])
        served = {name for name, _ in scrape(c.control(Info(ref=c.ref())).metrics)[0]}
    assert len(wanted) >= 15 and wanted <= served, sorted(wanted - served)

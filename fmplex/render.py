"""Text renderings for the CLI: replies, the task table, and `fmplex top`."""
from __future__ import annotations

import time

from ipc.messages import BackboneInfo, BackboneStats, InferReply, ListTasks, TaskStats


def reply_as_dict(reply: InferReply) -> dict:
    out = {"task": reply.task, "version": reply.version, "truncated": reply.truncated}
    if reply.labels is not None:
        out["labels"] = [[{"label": l.label, "score": l.score} for l in row] for row in reply.labels]
    if reply.embeddings is not None:
        out["embeddings"] = reply.embeddings.tolist()
    if reply.similarity is not None:
        out["similarity"] = reply.similarity
    if reply.tokens is not None:
        out["tokens"] = [[{"start": t.start, "end": t.end, "label": t.label, "score": t.score}
                          for t in row] for row in reply.tokens]
    return out


def summary(reply: InferReply, i: int, text: str = "") -> str:
    """One line describing the answer for input i."""
    if reply.labels is not None:
        return ", ".join(f"{l.label} {l.score:.3f}" for l in reply.labels[i])
    if reply.embeddings is not None:
        e = reply.embeddings[i]
        return f"embedding[{len(e)}] = [{', '.join(f'{x:+.3f}' for x in e[:4])}, ...]"
    if reply.similarity is not None:
        return f"cosine {reply.similarity[i]:.3f}"
    if reply.tokens is not None:
        return " ".join(f"{text[t.start:t.end]}/{t.label}" for t in reply.tokens[i]) or "(no tokens)"
    return "(empty)"


def reply_lines(reply: InferReply, texts: list[str]) -> list[str]:
    lines = [f"# {reply.task} version {reply.version}"]
    for i, text in enumerate(texts):
        mark = " (truncated)" if reply.truncated and reply.truncated[i] else ""
        lines.append(f"{text!r}{mark}: {summary(reply, i, text)}")
    return lines


def backbone_lines(backbones: list[BackboneInfo], tasks: list[TaskStats],
                   load: list[BackboneStats] = ()) -> list[str]:
    """`fmplex info`: each backbone with its family, dtype, region size and tasks, and its load
    (batches, throughput; a decoder's KV pool)."""
    lines, by_name = [], {s.name: s for s in load}
    for b in backbones:
        names = sorted(t.name for t in tasks if t.backbone == b.name)
        lines.append(f"backbone {b.name}: {b.family.value} ({b.model_type} {b.layers}x{b.hidden}) "
                     f"{b.dtype}, {b.region_bytes / 2**20:.1f} MiB, checksum {b.checksum}")
        lines.append(f"  {len(names)} task(s): {', '.join(names) if names else '-'}")
        s = by_name.get(b.name)
        if s is not None:
            kv = (f", KV {s.kv_blocks_used}/{s.kv_blocks_total} blocks of {s.kv_block_tokens} "
                  f"tokens, {s.sequences} generating, {s.preemptions} preempted"
                  if s.kv_blocks_total else "")
            lines.append(f"  {s.batches} batches, {s.tokens_per_s:.0f} tokens/s{kv}")
    return lines


def task_table(tasks: list[TaskStats]) -> str:
    head = (f"{'task':24s} {'state':8s} {'ver':>4s} {'weight':>6s} {'queued':>6s} {'req/s':>7s} "
            f"{'requests':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s} {'timeouts':>8s} "
            f"{'overload':>8s} {'restarts':>8s} {'cached':>7s}")
    rows = [head, "-" * len(head)]
    for t in sorted(tasks, key=lambda t: t.name):
        rows.append(f"{t.name:24s} {t.state.value:8s} {t.version:4d} {t.weight:6.2f} {t.queued:6d} "
                    f"{t.rate:7.1f} {t.requests:8d} {t.p50_ms:7.1f} {t.p99_ms:7.1f} {t.errors:6d} "
                    f"{t.timeouts:8d} {t.overloaded:8d} {t.restarts:8d} {t.cache_hits:7d}")
    return "\n".join(rows)


def top_loop(client, interval: float, once: bool) -> int:
    while True:
        tasks = client.control(ListTasks(ref=client.ref())).tasks
        table = task_table(tasks)
        if once:
            print(table)
            return 0
        print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S  fmplex top\n") + table, flush=True)
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0

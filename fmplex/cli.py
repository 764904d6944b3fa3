"""`fmplex`: the operator and client command line.

    fmplex demo                          the main job: daemon + tasks + load on the real backbone
    fmplex infer TASK TEXT... [--pair TEXT...] [--top-k K] [--json]
    fmplex generate TASK PROMPT [--chat] [--max-tokens N] [--temperature T] [--top-p P]
                    [--top-k K] [--seed S] [--stop STR ...] [--json]
                                         streams the text; --json prints one object at the end
    fmplex task run SPEC                 run a task process (as `python -m tasklets SPEC`)
    fmplex task deploy SPEC [SPEC...] [--parallel N]
                                         have the daemon start and supervise tasks (several: N at
                                         once, a line per task, progress on a terminal)
    fmplex task list | update NAME SPEC [--canary PCT] | promote NAME | rollback NAME | remove NAME
    fmplex top [--interval S] [--once]   live per-task table
    fmplex info | health [TASK]
    fmplex gateway [--listen 127.0.0.1:8000] [--api-keys FILE] [--max-body-mb MB]
                                         an OpenAI-compatible HTTP gateway to the tasks
    fmplex bench NAME ...                a benchmark of a source checkout (python -m bench.NAME)
    fmplex cluster deploy|remove|status|infer|keygen ...   a cluster of hosts (fmplex/cluster_cli.py)
Every command takes --run-dir (default: FMPLEX_RUN_DIR or the daemon's default).
Exit status: 0 ok, 1 request failed (typed error printed), 2 usage or set-up error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fmplex import cluster_cli
from ipc.errors import FmplexError


def _client(args):
    from fmplex.client import Client
    return Client(args.run_dir, timeout_s=args.timeout)


def cmd_infer(args) -> int:
    with _client(args) as c:
        reply = c.infer(args.task, args.texts, args.pair or None, top_k=args.top_k)
    from fmplex.render import reply_as_dict, reply_lines
    if args.json:
        print(json.dumps(reply_as_dict(reply), indent=2))
    else:
        print("\n".join(reply_lines(reply, args.texts)))
    return 0


def cmd_generate(args) -> int:
    sampling = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                  ("top_p", args.top_p), ("top_k", args.top_k),
                                  ("seed", args.seed), ("stop", args.stop)) if v is not None}
    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat \
        else {"prompt": args.prompt}
    with _client(args) as c:
        if args.json:
            reply = c.generate(args.task, **prompt, **sampling)
            print(json.dumps({"text": reply.text, "token_ids": reply.token_ids,
                              "prompt_tokens": reply.prompt_tokens,
                              "completion_tokens": reply.completion_tokens,
                              "finish_reason": reply.finish_reason.value}))
            return 0
        for part in c.stream(args.task, **prompt, **sampling):
            if hasattr(part, "finish_reason"):
                print(f"\n[{part.finish_reason.value}: {part.completion_tokens} tokens]",
                      file=sys.stderr)
            else:
                print(part.text, end="", flush=True)
    return 0


def cmd_task(args) -> int:
    from ipc.messages import Deploy, ListTasks, Op, RemoveTask, TaskCommand
    if args.action == "run":
        from tasklets.process import main as run_task
        return run_task(args.spec, args.run_dir)
    if args.action == "deploy" and len(args.spec) > 1:
        return deploy_many(args)
    with _client(args) as c:
        if args.action == "deploy":
            path = os.path.abspath(args.spec[0])
            with open(path) as f:
                reply = c.control(Deploy(ref=c.ref(), spec=f.read(), spec_path=path),
                                  timeout_s=max(args.timeout, 180))
        elif args.action == "list":
            from fmplex.render import task_table
            print(task_table(c.control(ListTasks(ref=c.ref())).tasks))
            return 0
        elif args.action == "remove":
            reply = c.control(RemoveTask(ref=c.ref(), name=args.name))
        else:
            spec, spec_dir = "", ""
            if args.action == "update":
                path = os.path.abspath(args.spec)
                with open(path) as f:
                    spec, spec_dir = f.read(), os.path.dirname(path)
            op = {"update": Op.UPDATE, "promote": Op.PROMOTE, "rollback": Op.ROLLBACK}[args.action]
            reply = c.control(TaskCommand(ref=c.ref(), name=args.name, op=op, spec=spec,
                                          spec_dir=spec_dir, canary_percent=args.canary or 0))
    print(reply.message)
    return 0


def deploy_many(args) -> int:
    """Deploy several specs, `--parallel` at a time: one line per task as it serves (or fails),
    and on a terminal a progress line. Exit 1 if any failed."""
    import asyncio

    from fmplex.client import AsyncClient
    from fmplexd.progress import TerminalLine
    from ipc import aio
    from ipc.messages import Deploy
    paths = [os.path.abspath(p) for p in args.spec]
    line, done, failed = TerminalLine(), [], []

    async def one(client, gate, path):
        async with gate:
            try:
                with open(path) as f:
                    text = f.read()
                reply = await client.control(Deploy(ref=client.ref(), spec=text, spec_path=path),
                                             timeout_s=max(args.timeout, 180))
                message = reply.message
            except (FmplexError, OSError) as e:
                failed.append(path)
                message = f"{os.path.basename(path)}: {e}"
            done.append(path)
            line.draw("")
            print(f"[{len(done)}/{len(paths)}] {message}", flush=True)
            line.draw(f"deploying: {len(done)}/{len(paths)} done"
                      + (f", {len(failed)} failed" if failed else ""))

    async def main():
        gate = asyncio.Semaphore(max(1, args.parallel))
        async with AsyncClient(args.run_dir, timeout_s=args.timeout) as client:
            line.draw(f"deploying: 0/{len(paths)} done")
            await asyncio.gather(*(one(client, gate, p) for p in paths))
    aio.run(main())
    line.end(f"deployed {len(paths) - len(failed)}/{len(paths)} task(s)")
    return 1 if failed else 0


def cmd_top(args) -> int:
    from fmplex.render import top_loop
    with _client(args) as c:
        return top_loop(c, args.interval, args.once)


def cmd_info(args) -> int:
    from ipc.messages import Health, Info, ListTasks
    with _client(args) as c:
        if args.command == "health":
            wait_ms = int(args.wait * 1000) if args.task else 0
            h = c.control(Health(ref=c.ref(), name=args.task or "", wait_ms=wait_ms),
                          timeout_s=args.timeout + args.wait)
            print(f"live={h.live} ready={h.ready} {h.detail}")
            return 0 if h.ready else 1
        info = c.control(Info(ref=c.ref()))
        tasks = c.control(ListTasks(ref=c.ref())).tasks
    metrics = f"  metrics {info.metrics}" if info.metrics else ""
    print(f"fmplexd {info.version}  epoch {info.epoch:x}  up {info.uptime_s:.0f}s  run dir "
          f"{info.run_dir}{metrics}")
    from fmplex.render import backbone_lines
    print("\n".join(backbone_lines(info.backbones, tasks, info.load)))
    for r in info.regions:
        print(f"  region {r.name:32s} {r.kind:9s} {r.bytes / 2**20:9.2f} MiB")
    return 0


def cmd_gateway(args) -> int:
    try:
        from fmplex.gateway.server import serve
    except ImportError as e:
        print(f"fmplex: the gateway needs its extra: pip install 'fmplex[gateway]' ({e})",
              file=sys.stderr)
        return 2
    return serve(args.listen, args.api_keys, args.run_dir, int(args.max_body_mb * 2**20),
                 args.request_timeout)


def cmd_demo(args) -> int:
    from fmplex.demo import run_demo
    return run_demo(requests=args.requests, clients=args.clients, quick=args.quick)


def cmd_bench(args) -> int:
    """Benchmarks live in the source checkout (bench/), not in the installed package: run
    `python -m bench.NAME` from the checkout this package was installed from."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "bench", f"{args.name}.py")):
        print(f"fmplex: no benchmark bench/{args.name}.py in {root} (benchmarks need a source "
              f"checkout)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", f"bench.{args.name}", *args.rest], cwd=root)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fmplex", description="fmplex operator and client CLI")
    ap.add_argument("--run-dir", default=None, help="the daemon's run directory")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("infer", help="run inputs through a task")
    p.add_argument("task")
    p.add_argument("texts", nargs="+")
    p.add_argument("--pair", action="append", help="second text (sentence-similarity), repeatable")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_infer)
    p = sub.add_parser("generate", help="generate text with a text-generation task (streams)")
    p.add_argument("task")
    p.add_argument("prompt", help="a raw prompt (special tokens recognized), or with --chat the "
                   "user's message")
    p.add_argument("--chat", action="store_true", help="send PROMPT as one user chat message")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", nargs="+", help="stop strings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_generate)
    t = sub.add_parser("task", help="task lifecycle").add_subparsers(dest="action", required=True)
    q = t.add_parser("run")
    q.add_argument("spec")
    q.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    q = t.add_parser("deploy")
    q.add_argument("spec", nargs="+")
    q.add_argument("--parallel", type=int, default=4, help="deployments at once (several specs)")
    t.add_parser("list")
    q = t.add_parser("update")
    q.add_argument("name")
    q.add_argument("spec")
    q.add_argument("--canary", type=int, help="percent of requests for the new version")
    for name in ("promote", "rollback", "remove"):
        t.add_parser(name).add_argument("name")
    for q in t.choices.values():
        q.set_defaults(fn=cmd_task, canary=None)
    p = sub.add_parser("top", help="live per-task table")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true")
    p.set_defaults(fn=cmd_top)
    sub.add_parser("info", help="daemon, backbones, memory regions").set_defaults(fn=cmd_info, wait=0.0)
    p = sub.add_parser("health", help="readiness of the daemon or a task")
    p.add_argument("task", nargs="?")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the task to be ready")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway to the tasks")
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (port 0: any free one)")
    p.add_argument("--api-keys", help="TOML file of API keys and their owners; without one the "
                   "gateway listens on loopback only and every caller is this user")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take (a request may set timeout_ms)")
    p.set_defaults(fn=cmd_gateway)
    p = sub.add_parser("demo", help="the main job on the embedded backbone")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="fewer requests (for tests)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("bench", help="run a benchmark from bench/")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    cluster_cli.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except FmplexError as e:
        print(f"fmplex: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fmplex: {e!r}", file=sys.stderr)
        return 2

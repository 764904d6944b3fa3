"""`fmplex cluster ...`: the operator's commands for a cluster, over the controller's service
(tcp:// + CURVE); no Ray on the operator's machine.

    fmplex cluster keygen DIR NAME        a CURVE key pair as ZeroMQ certificates:
                                          DIR/NAME.key (public) and DIR/NAME.key_secret
    fmplex cluster deploy SPEC [--rate R] [--slo-ms MS] [--replicas N] [--max-replicas M]
                                          [--wait S]  (wait until a replica serves)
    fmplex cluster remove NAME
    fmplex cluster status [--json]        hosts, tasks, replicas, rates, p99 vs SLO
    fmplex cluster infer TASK TEXT... [--pair TEXT...] [--top-k K] [--json]
                                          one request through the cluster's routing
Where and who: --address (or FMPLEX_CLUSTER), --server-key: the service's public certificate
file or Z85 key (or FMPLEX_CLUSTER_KEY), --cert: your secret certificate file (or
FMPLEX_CLUSTER_CERT); deploy/remove/status need an operator's key, infer a client's.
"""
from __future__ import annotations

import json
import os
import sys

WAIT_POLL_MS = 5000


def add_parser(sub) -> None:
    """Add `cluster` and its commands to the `fmplex` command line's subparsers."""
    p = sub.add_parser("cluster", help="a cluster of hosts (Ray): deploy, remove, status, infer")
    p.add_argument("--address", default=os.environ.get("FMPLEX_CLUSTER"),
                   help="the controller's service, tcp://HOST:PORT (FMPLEX_CLUSTER)")
    p.add_argument("--server-key", default=os.environ.get("FMPLEX_CLUSTER_KEY"),
                   help="its public certificate file or Z85 key (FMPLEX_CLUSTER_KEY)")
    p.add_argument("--cert", default=os.environ.get("FMPLEX_CLUSTER_CERT"),
                   help="your secret certificate file (FMPLEX_CLUSTER_CERT)")
    c = p.add_subparsers(dest="action", required=True)
    q = c.add_parser("keygen", help="write a CURVE key pair (ZeroMQ certificates)")
    q.add_argument("dir")
    q.add_argument("name")
    q = c.add_parser("deploy", help="run a task somewhere in the cluster")
    q.add_argument("spec")
    q.add_argument("--rate", type=float, default=0.0, help="expected requests per second")
    q.add_argument("--slo-ms", type=int, default=0, help="p99 objective (default: its deadline)")
    q.add_argument("--replicas", type=int, default=1, help="at least this many hosts")
    q.add_argument("--max-replicas", type=int, default=0,
                   help="autoscale up to (default: --replicas)")
    q.add_argument("--wait", type=float, default=0.0, help="seconds to wait until it serves")
    c.add_parser("remove", help="stop a task everywhere").add_argument("name")
    c.add_parser("status", help="hosts and tasks").add_argument("--json", action="store_true")
    q = c.add_parser("infer", help="one request through the cluster's routing")
    q.add_argument("task")
    q.add_argument("texts", nargs="+")
    q.add_argument("--pair", action="append")
    q.add_argument("--top-k", type=int, default=0)
    q.add_argument("--json", action="store_true")
    for q in c.choices.values():
        q.set_defaults(fn=run)


def run(args) -> int:
    if args.action == "keygen":
        import zmq.auth
        os.makedirs(args.dir, exist_ok=True)
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
        print(f"public {public}\nsecret {secret}")
        return 0
    access = _access(args)
    if args.action == "infer":
        from fmplex.client import Client
        from fmplex.render import reply_as_dict, reply_lines
        with Client(timeout_s=args.timeout, cluster=access.address, cluster_key=access.server_key,
                    keypair=(access.public, access.secret)) as c:
            reply = c.infer(args.task, args.texts, args.pair or None, top_k=args.top_k)
        print(json.dumps(reply_as_dict(reply), indent=2) if args.json
              else "\n".join(reply_lines(reply, args.texts)))
        return 0
    import zmq
    from fmplex.routing import Router
    ctx = zmq.Context()
    router = Router(ctx, access, link=None)
    try:
        return _operate(args, router)
    finally:
        router.close()
        ctx.term()


def _operate(args, router) -> int:
    from ipc.messages import ClusterRemove, ClusterStatus, RouteQuery
    if args.action == "deploy":
        msg = _deploy_message(args, router.ref())
        print(router.request(msg, args.timeout).message)
        if args.wait > 0:
            from ipc.spec import parse_spec
            name = parse_spec(msg.spec, msg.spec_dir).name
            query = RouteQuery(ref=router.ref(), tasks=[name], wait_ms=int(args.wait * 1000))
            table = router.request(query, args.wait + args.timeout)
            hosts = [e.host for r in table.routes for e in r.endpoints]
            if not hosts:
                print(f"{name} is not serving yet")
                return 1
            print(f"{name} serves on {', '.join(hosts)}")
        return 0
    if args.action == "remove":
        print(router.request(ClusterRemove(ref=router.ref(), name=args.name), args.timeout).message)
        return 0
    status = router.request(ClusterStatus(ref=router.ref()), args.timeout)
    if args.json:
        from dataclasses import asdict
        print(json.dumps(asdict(status), indent=2))
    else:
        print("\n".join(status_lines(status)))
    return 0


def status_lines(status) -> list[str]:
    """The cluster_status_reply as two tables: hosts, then tasks."""
    out = [f"route table version {status.version}",
           f"{'host':12s} {'tasks':>5s} {'load':>5s} {'memory used':>12s}  backbones"]
    for h in status.hosts:
        out.append(f"{h.name:12s} {h.tasks:5d} {h.load:5.2f} "
                   f"{h.used_bytes / 2**20:8.0f} MiB  {', '.join(h.backbones)}")
    out.append(f"{'task':24s} {'backbone':12s} {'replicas':>8s} {'rate/s':>7s} {'p99 ms':>7s} "
               f"{'slo ms':>7s}  hosts")
    for t in status.tasks:
        out.append(f"{t.name:24s} {t.backbone:12s} {len(t.hosts):4d}/{t.replicas:<3d} "
                   f"{t.rate:7.1f} {t.p99_ms:7.1f} {t.slo_ms:7d}  {', '.join(t.hosts) or '-'}")
    return out


def _deploy_message(args, ref: int):
    from ipc.messages import ClusterDeploy
    from ipc.spec import load_spec
    path = os.path.abspath(args.spec)
    spec = load_spec(path)                     # check it here: errors name the operator's file
    with open(path) as f:
        text = f.read()
    return ClusterDeploy(ref=ref, spec=text, spec_dir=os.path.dirname(path), rate=args.rate,
                         slo_ms=args.slo_ms, min_replicas=args.replicas,
                         max_replicas=max(args.max_replicas, args.replicas),
                         memory_bytes=sum(_size(p) for p in (spec.adapter, spec.head) if p))


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.exists(path) else 0


def _access(args):
    """Where the service is and the keys (exit status 2 when something is missing)."""
    from fmplex.routing import ClusterAccess
    if not (args.address and args.server_key and args.cert):
        print("fmplex cluster: give --address, --server-key and --cert (or FMPLEX_CLUSTER, "
              "FMPLEX_CLUSTER_KEY, FMPLEX_CLUSTER_CERT)", file=sys.stderr)
        raise SystemExit(2)
    if os.path.exists(args.server_key):
        return ClusterAccess.from_certs(args.address, args.server_key, args.cert)
    access = ClusterAccess.from_certs(args.address, args.cert, args.cert)   # keys of --cert
    return ClusterAccess(args.address, args.server_key, access.public, access.secret)

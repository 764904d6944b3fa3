"""The cluster layer: fmplex on many hosts, with Ray Core as the control plane.

Ray provides membership, failure detection and the placement and restart of fmplex's own processes;
fmplex provides the policy. Requests never travel through Ray: clients resolve a task to the tcp://
endpoints of the task processes that serve it (the controller's routing service) and talk ZeroMQ
to them directly.

    placement.py   the sharing-aware placement policy (a pure function)
    autoscale.py   the replica autoscaling policy (pure)
    controller.py  the controller: reconciles desired and actual placement (a detached Ray actor)
    service.py     the controller's routing and operator socket (tcp:// + CURVE)
    agent.py       one per host: drives the local fmplexd over its control socket, reports load
    membership.py  hosts from Ray's live nodes and their label; the agents as actors
    store.py       the controller's durable state in Ray's GCS
    config.py      cluster.toml; specs.py a host's task spec; reports.py what agents report
    launch.py      start / find / stop the controller (`python -m cluster`, __main__.py)

Only controller.py, membership.py, store.py, launch.py and __main__.py import Ray; the policies,
the service, the agent and the plain data modules do not (they are tested without it).
"""

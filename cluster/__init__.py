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
    ...

Only placement.py, autoscale.py and the plain data modules import without Ray installed.
"""

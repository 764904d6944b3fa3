"""The pieces of bench/cluster_sim.py (the cluster-scale claim, simulated), one job per module:

    fleet.py      fleets, backbones, their sizes and costs, each figure with its source
                  (measured here, public, or assumed)
    trace.py      the simulated tasks (zipf rates, backbone mix, SLOs) and their requests
    policies.py   one instance per task, MuxServe-style and fmplex: deployments, the latter two
                  from the real placement function (cluster/placement.py)
    engine.py     the discrete-event simulation of a deployment: every request's latency
"""

"""Who is in the cluster, from Ray: the live nodes that carry the host label, and their agents.

A host is a Ray node started with the label `{host_label}={name}` (`ray start --labels
fmplex-host=NAME`); its name is the label's value. Its agent is the detached actor
`fmplex-agent-NAME`, pinned to that node by the same label (label_selector; Ray's
NodeLabelSchedulingStrategy is not used: it misplaced actors in our measurements), created by the
controller and found again by name after a controller restart. An agent does not restart by
itself (max_restarts=0): when it or its node dies, the controller sees the failure and makes a new
one once the node is back.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray

from cluster.agent import HostAgent
from cluster.config import NAMESPACE, ClusterConfig, agent_name


@dataclass(frozen=True, slots=True)
class Node:
    host: str                    # the label's value
    node_id: str
    ip: str


def live_hosts(label: str) -> dict[str, Node]:
    """host name -> its node, for every live Ray node carrying the label."""
    out = {}
    for n in ray.nodes():
        name = (n.get("Labels") or {}).get(label)
        if n.get("Alive") and name:
            out[name] = Node(name, n["NodeID"], n.get("NodeManagerAddress", ""))
    return out


def agent(config: ClusterConfig, node: Node):
    """The host's agent actor: the existing one, or a new one pinned to its node."""
    actor = ray.remote(HostAgent)
    return actor.options(
        name=agent_name(node.host), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=0, num_cpus=0, max_concurrency=16,
        label_selector={config.host_label: node.host},
    ).remote(node.host, config.run_dir_of(node.host), config.state_dir_of(node.host),
             config.advertise or node.ip, config.host_memory_bytes, config.ports_of(node.host))


def kill_agents(hosts) -> None:
    for host in hosts:
        try:
            ray.kill(ray.get_actor(agent_name(host), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass

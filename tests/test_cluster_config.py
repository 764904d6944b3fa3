"""The cluster's configuration: packaging/cluster.toml, the example operators copy, loads (with its
certificate paths pointed at real certificates) and every setting lands where it should."""
import os

import pytest
import zmq.auth

from cluster.config import ClusterConfig, load_cluster_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_packaged_example_loads(tmp_path):
    for name in ("cluster", "alice", "web"):
        zmq.auth.create_certificates(str(tmp_path), name)
    with open(os.path.join(REPO, "packaging", "cluster.toml")) as f:
        text = f.read()
    text = (text.replace("/etc/fmplex/certs/operators/", f"{tmp_path}/")
                .replace("/etc/fmplex/certs/clients/", f"{tmp_path}/")
                .replace("/etc/fmplex/certs/", f"{tmp_path}/"))
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    config = load_cluster_config(str(path))
    public, secret = zmq.auth.load_certificate(str(tmp_path / "cluster.key_secret"))
    assert (config.server_public, config.server_secret) == (public.decode(), secret.decode())
    assert config.operator_keys == (zmq.auth.load_certificate(str(tmp_path / "alice.key"))[0]
                                    .decode(),)
    assert len(config.client_keys) == 1 and config.ports == (20000, 29999)
    assert config.cost_s("default") == 0.012 and config.cost_s("other") == 0.010
    assert config.placement.move_cost == 0.5 and config.scaling.cooldown_s == 15.0
    assert config.run_dir_of("any") == "/run/fmplex"
    assert config.state_dir_of("h1") == "/var/lib/fmplex/cluster/h1"


def test_a_bad_setting_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('bind = "tcp://0.0.0.0:1"\nno_such_setting = 1\n')
    with pytest.raises(ValueError, match="no_such_setting"):
        load_cluster_config(str(path))
    with pytest.raises(ValueError, match="key pair"):
        ClusterConfig()

"""Every Ray node mmflow or its tests start listens on 127.0.0.1, with no dashboard."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import LOOPBACK, add_loopback_node

pytestmark = pytest.mark.ray


def _node_addresses(ray) -> list[str]:
    return [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]


def test_a_local_sweep_starts_ray_on_loopback_without_dashboard(monkeypatch) -> None:
    import ray
    from ray._private import ray_constants

    from mmflow.sweep.ray_session import LOOPBACK_ENV, ray_session
    from mmflow.sweep.settings import RaySettings

    # as in a user's process: Ray in its normal mode (the tests' conftest chose loopback for all)
    monkeypatch.delenv(LOOPBACK_ENV)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)

    with ray_session(RaySettings(init={"num_cpus": 1})):
        addresses = _node_addresses(ray)
        context = ray.get_runtime_context()
        assert context.gcs_address.startswith(f"{LOOPBACK}:")
        assert not ray._private.worker.global_worker.node.webui_url  # dashboard off
    assert addresses == [LOOPBACK]
    assert LOOPBACK_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER  # left as it was


def test_a_local_sweep_keeps_token_auth_without_announcing_it(monkeypatch, capfd) -> None:
    """Ray says "Token authentication is enabled" on every local start when RAY_AUTH_MODE is unset; a
    sweep's output leaves that line out, and the cluster still uses token authentication."""
    import ray
    from ray._private.authentication.authentication_token_setup import get_authentication_mode
    from ray._raylet import AuthenticationMode

    from mmflow.sweep.ray_session import AUTH_LOGGER, ray_session
    from mmflow.sweep.settings import RaySettings

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with ray_session(RaySettings(init={"num_cpus": 1})):
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        assert ray.get(ray.remote(lambda: 2).remote()) == 2
    assert "Token authentication" not in capfd.readouterr().err
    assert not logging.getLogger(AUTH_LOGGER).filters  # only while Ray starts


def test_test_clusters_put_every_node_on_loopback(ray_cluster) -> None:
    import ray

    node = add_loopback_node(ray_cluster, num_cpus=1)
    try:
        ray.init(address=ray_cluster.address)
        try:
            addresses = _node_addresses(ray)
        finally:
            ray.shutdown()
    finally:
        ray_cluster.remove_node(node)
    assert len(addresses) >= 2 and set(addresses) == {LOOPBACK}  # other tests may have added nodes
    assert ray_cluster.address.startswith(f"{LOOPBACK}:")

"""Where a sweep's Ray runs: joining a cluster (`hydra.launcher.ray.init.address`) or a local Ray
started for the sweep alone, on 127.0.0.1 with no dashboard. Secrets of `runtime_env.env_vars` reach a
local Ray through its environment, never through Ray's runtime_env, which Ray writes to its logs.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import ray

from mmflow.storage.secrets import env_vars_to_environ, forwarded_env, warn_runtime_env_secrets
from mmflow.sweep.settings import RaySettings

log = logging.getLogger(__name__)

# A Ray that mmflow starts itself listens on loopback only (`loopback_only`).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's logger that announces its default token authentication on every local start (`quiet_token_auth`).
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[None]:
    """Join `init.address` (`auto`, `ray://…`, host:port) or start a local Ray when it is empty."""
    if ray.is_initialized():
        yield
        return
    init = {k: v for k, v in copy.deepcopy(dict(settings.init or {})).items() if v is not None}
    address = str(init.pop("address", None) or "").strip() or None
    env = forwarded_env(settings.forward_env or [], os.environ)  # never secret-named variables
    runtime_env = init.pop("runtime_env", None) or {}
    if address is not None:
        warn_runtime_env_secrets(runtime_env)
    if env:
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
    kwargs: dict[str, Any] = {"log_to_driver": True, **init, "runtime_env": runtime_env or None}
    if address is None:  # a local Ray for this sweep only: on loopback, no dashboard
        kwargs.setdefault("include_dashboard", False)
    else:
        for local_only in ("num_cpus", "num_gpus"):
            kwargs.pop(local_only, None)
    log.info("Ray: %s", f"joining {address}" if address else "starting a local instance")
    if address is not None:
        check_reachable(address, float(settings.connect_timeout_s or 60))
    # "local": a private instance even when another Ray runs on this machine (plain `None` would join it)
    with ExitStack() as stack:
        if address is None:  # a local Ray: on loopback; env_vars reach it through its environment
            stack.enter_context(loopback_only())
            stack.enter_context(quiet_token_auth())
            if kwargs["runtime_env"]:
                clean = stack.enter_context(env_vars_to_environ(kwargs["runtime_env"]))
                kwargs["runtime_env"] = clean or None
        ray.init(address=address or "local", **kwargs)
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def loopback_only() -> Iterator[None]:
    """Start Ray's processes on 127.0.0.1 only (nothing outside this machine can reach them).

    Ray replaces a node address of 127.0.0.1 with the machine's network address
    (`ray._private.services.resolve_ip_for_localhost`) unless it runs in its single-machine mode,
    which the variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 selects: the processes Ray starts read the
    variable, this process reads `ray_constants.ENABLE_RAY_CLUSTER` (set here while Ray starts).
    """
    from ray._private import ray_constants

    before_env = os.environ.get(LOOPBACK_ENV)
    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env


@contextmanager
def quiet_token_auth() -> Iterator[None]:
    """Leave out Ray's "Token authentication is enabled for this Ray cluster" line while a local Ray starts.

    Ray >= 2.52 turns token authentication on for a new local cluster whose `RAY_AUTH_MODE` is unset
    and says so on every start. It is what a local sweep wants (nothing else may submit work to its
    Ray), so the line is noise. The mode must not be set from here instead: Ray reads it when it is
    imported. Every other message of that logger (e.g. "disabled") still shows.
    """
    logger = logging.getLogger(AUTH_LOGGER)
    only_enabled = _DropMessage("Token authentication is enabled")
    logger.addFilter(only_enabled)
    try:
        yield
    finally:
        logger.removeFilter(only_enabled)


class _DropMessage(logging.Filter):
    """Drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast when a `host:port` or `ray://host:port` address does not answer (Ray would retry for
    many minutes); `auto` is left to Ray, which fails at once when no cluster is known."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"no Ray cluster answers at {address} after {timeout_s:g} s ({exc}); start one with "
                    "`ray start --head` or fix hydra.launcher.ray.init.address"
                ) from None
            time.sleep(1)

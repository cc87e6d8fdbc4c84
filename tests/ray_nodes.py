"""Ray nodes as real `ray start --block` processes on 127.0.0.1, for multi-node tests.

Each node gets its own temp dir, ports and resources, no dashboard; `stop` (or `kill`, as a preempted
node) ends exactly the processes that node started, found by their ids, never by name (other Ray
clusters may run on the same machine). A worker may run in its own mount namespace with an empty
tmpfs over a folder (`private`), so nothing it writes there is seen outside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE = str(100 * 2**20)
# Token auth off for these private test clusters (a shared ~/.ray/auth_token must not decide it);
# drivers that join them get the same environment (`ENV`).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_unshare() -> bool:
    """Whether this process may make a mount namespace with a tmpfs in it (root, util-linux)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs t /mnt"]
    return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0


class RayNode:
    """One `ray start --block` process and every process under it."""

    def __init__(
        self, args: list[str], cpus: int, private: Path | None = None, timeout_s: float = 90
    ) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mmr-", dir="/tmp"))  # short: Ray's socket paths
        cmd = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE}",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            *args,
        ]
        if private is not None:  # the node sees an empty, private tmpfs at `private`
            private.mkdir(parents=True, exist_ok=True)
            mount = 'mount -t tmpfs mmflow-private "$0" && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(private), *cmd]
        # conftest's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes `ray start
        # --address` refuse to add a worker; these nodes are pinned to 127.0.0.1 by their own flag
        env = {**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.output: list[str] = []
        started = threading.Event()
        threading.Thread(target=self._read, args=(started,), daemon=True).start()
        if not started.wait(timeout_s):
            self.stop()
            raise RuntimeError("ray start did not come up:\n" + "".join(self.output[-40:]))
        self.started = time.monotonic()

    def _read(self, started: threading.Event) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "Ray runtime started" in line:
                started.set()

    def pids(self) -> set[int]:
        """The ids of this node's processes now (raylet, its workers and actors, and `ray start`)."""
        try:
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(p.pid for p in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

    def kill(self) -> None:
        """SIGKILL every process of this node at once (a preempted machine)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL what is left after 10 s) and remove its temp dir."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.2)
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(cpus: int) -> tuple[RayNode, str]:
    """A head node and its address (`127.0.0.1:<port>`)."""
    port = free_port()
    args = [
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    return RayNode(args, cpus), f"127.0.0.1:{port}"


def start_worker(address: str, cpus: int, private: Path | None = None) -> RayNode:
    return RayNode([f"--address={address}"], cpus, private)

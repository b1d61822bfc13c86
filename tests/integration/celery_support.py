"""Helpers for the Celery tests: the test broker, a real worker process, waiting.

The tests use their own Redis database (TEST_REDIS_DB, or EVENT_STREAM_TEST_REDIS_URL) and
queue names unique to each run, so a short visibility timeout here never touches the messages of
anything else using the same Redis server. A worker on the app's own queues (started without
-Q, as the README starts it) gets a Redis database of its own, DEFAULT_QUEUES_REDIS_DB: those
queue names are the same in every run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
HANDLERS_MODULE = "tests.integration.celery_worker_handlers"
TEST_REDIS_DB = 11
DEFAULT_QUEUES_REDIS_DB = 13  # 12 is bench/relay.py's
RABBITMQ_URL = os.environ.get("EVENT_STREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

# Short enough for a test to see a dead worker's task come back; every task of the test
# handlers finishes well within it (except the one that hangs on purpose).
WORKER_TRANSPORT_OPTIONS = (
    '{"visibility_timeout": 3, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}'
)


def redis_url_for_tests(db: int = TEST_REDIS_DB) -> str:
    url = os.environ.get("EVENT_STREAM_TEST_REDIS_URL")
    if url:
        return url if db == TEST_REDIS_DB else urlunsplit(urlsplit(url)._replace(path=f"/{db}"))
    base = os.environ.get("CELERY_BROKER_URL", "")
    if base.startswith("redis://"):
        return urlunsplit(urlsplit(base)._replace(path=f"/{db}"))
    return f"redis://127.0.0.1:6379/{db}"


def unique_queue(prefix: str = "es_test") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def forget_queue(queue: str, redis_url: str | None = None) -> None:
    """Delete a test queue and kombu's bindings of it from the test Redis database."""
    import redis

    client = redis.Redis.from_url(redis_url or redis_url_for_tests())
    try:
        keys = [queue, *client.scan_iter(match=f"*{queue}*", count=1000)]
        client.delete(*keys)
    finally:
        client.close()


def database_url(settings_dict: dict) -> str:
    """DATABASE_URL of a Django database entry (the test database, for child processes)."""
    s = settings_dict
    host = quote(str(s.get("HOST") or "127.0.0.1"), safe="")
    port = s.get("PORT") or 5432
    password = f":{quote(s['PASSWORD'], safe='')}" if s.get("PASSWORD") else ""
    return f"postgresql://{s.get('USER') or 'postgres'}{password}@{host}:{port}/{s['NAME']}"


def make_app(broker_url: str):
    """A Celery app configured like celery_app's, on another broker."""
    from celery import Celery

    from celery_app import declare_queues

    app = Celery("event_stream_tests", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    declare_queues(app.conf)
    app.conf.broker_url = broker_url
    # Celery prefers the CELERY_BROKER_URL variable to broker_url; these two it does not.
    app.conf.broker_write_url = app.conf.broker_read_url = broker_url
    app.conf.broker_connection_retry_on_startup = True
    return app


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


class LoggedProcess:
    """A child process writing to a log file: `start` it in a subclass; read its log; stop it."""

    log_path: Path
    process: subprocess.Popen | None = None
    _log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, as in production; the exit status (None if it was never started)."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return None if process is None else process.returncode


class Worker(LoggedProcess):
    """`celery -A celery_app worker` as a child process, logging to a file.

    On `queue` alone (-Q), or, with queue=None, on the app's queues, as the README starts it.
    """

    def __init__(
        self,
        *,
        broker_url: str,
        database_url: str,
        queue: str | None,
        log_path: Path,
        record_dir: Path,
        pool: str = "solo",
        env: dict[str, str] | None = None,
        imports: tuple[str, ...] = (),
    ):
        self.queue = queue
        self.imports = (HANDLERS_MODULE, *imports)
        self.log_path = log_path
        self.pool = pool
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_BROKER_TRANSPORT_OPTIONS": WORKER_TRANSPORT_OPTIONS,
            "EVENT_STREAM_TEST_RECORD_DIR": str(record_dir),
            "OUTBOX_CELERY_MAX_RETRIES": "2",
            "OUTBOX_CELERY_RETRY_BACKOFF": "0.1",
            "OUTBOX_CELERY_RETRY_BACKOFF_MAX": "0.5",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 60) -> Worker:
        pool = ["--pool=solo"] if self.pool == "solo" else ["--pool=prefork", "--concurrency=1"]
        queues = ["-Q", self.queue] if self.queue else []
        node = self.queue or unique_queue("es_test_app_queues")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "celery_app", "worker", *pool, *queues,
                "-I", ",".join(self.imports), "-n", f"{node}@%h",
                "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "INFO",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        ready = wait_until(lambda: " ready." in self.log() or self.process.poll() is not None,
                           timeout)  # fmt: skip
        if not ready or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"the worker did not start:\n{self.log()[-4000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL the worker (its main process): no chance to ack or requeue anything."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


class TcpProxy:
    """A TCP forwarder that can be switched off and on, to play a broker going away."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        # True: new connections are closed at once, open ones keep working (a broker or
        # database that takes no new clients, while a worker's consumer stays connected).
        self.refuse_new = False

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        for s in [server, *sockets]:
            if s is None:
                continue
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            if self.refuse_new:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # the 5 s were for connecting: an idle link stays up
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def forget_app_queues(redis_url: str) -> None:
    """Empty the test database of a worker on the app's own queues (DEFAULT_QUEUES_REDIS_DB):
    the queues, and the messages taken but not acked."""
    from celery_app import CHECKS_QUEUE, app

    for queue in (app.conf.task_default_queue, CHECKS_QUEUE, "unacked"):
        forget_queue(queue, redis_url)


@contextlib.contextmanager
def running_worker(
    *,
    broker_url: str,
    database_url: str,
    record_dir: Path,
    log_dir: Path,
    queue_prefix: str = "es_test",
    imports: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
):
    """A started worker on a queue of its own; stopped, and its queue forgotten, afterwards."""
    worker = Worker(
        broker_url=broker_url,
        database_url=database_url,
        queue=unique_queue(queue_prefix),
        log_path=log_dir / "worker.log",
        record_dir=record_dir,
        imports=imports,
        env=env,
    )
    try:
        yield worker.start()
    finally:
        worker.stop()
        forget_queue(worker.queue, broker_url)

"""What the benchmarks that start a real gateway share: a free port, waiting for a listener, and the
RSS of the gateway with its worker processes."""

from __future__ import annotations

import socket
import threading
import time

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class RssWatch(threading.Thread):
    """Samples the RSS of a process and its children together every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0  # since the last reset_peak
        self.overall = 0
        self.last = 0
        self.running = True

    def sample(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)

    def run(self) -> None:
        while self.running:
            try:
                self.last = self.sample()
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)
            self.overall = max(self.overall, self.last)
            time.sleep(self.interval)

    def reset_peak(self) -> None:
        self.peak = self.last

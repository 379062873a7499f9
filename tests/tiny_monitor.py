"""A monitor's socket side in a few lines, for tests of the process side: a real
`multiprocessing.connection.Listener` with a key, accepting connections at any time, each read
on its own thread and decoded with `marlwatch.wire.decode`."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from marlwatch import autostart_dir, wire


class TinyMonitor:
    def __init__(self, authkey: bytes | None = None) -> None:
        self.key = authkey or os.urandom(16)
        self.dir = tempfile.mkdtemp(prefix="mw-")  # short: AF_UNIX paths are at most 107 bytes
        self.path = os.path.join(self.dir, "monitor.sock")
        self.listener = Listener(self.path, family="AF_UNIX", authkey=self.key, backlog=16)
        self.connections: list[list] = []  # the decoded frames of each connection, in order
        self.ended: list[bool] = []
        self.refused = 0
        self._closing = False
        self._readers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self.listener.accept()
            except (AuthenticationError, EOFError, ConnectionError):
                self.refused += 1
                continue
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            frames: list = []
            self.connections.append(frames)
            self.ended.append(False)
            t = threading.Thread(target=self._read, args=(conn, frames, len(self.ended) - 1), daemon=True)
            t.start()
            self._readers.append(t)

    def _read(self, conn: Connection, frames: list, index: int) -> None:
        try:
            while True:
                frames.append(wire.decode(conn.recv_bytes()))
        except (EOFError, OSError):
            self.ended[index] = True

    def env(self, *, key: bytes | None = None, auto_phases: bool = False, bootstrap: bool = False) -> dict:
        env = {**os.environ, "MARLWATCH_ADDRESS": f"unix:{self.path}",
               "MARLWATCH_AUTHKEY": (key or self.key).hex(), "MARLWATCH_AUTO_PHASES": "1" if auto_phases else "0"}
        repo = str(Path(__file__).resolve().parents[1])
        path = [autostart_dir()] if bootstrap else []
        env["PYTHONPATH"] = os.pathsep.join([*path, repo, *filter(None, [os.environ.get("PYTHONPATH")])])
        return env

    def wait_ended(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.ended) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{sum(self.ended)} of {count} connections ended: {self.summary()}")
            time.sleep(0.05)

    def hellos(self) -> list[dict]:
        return [c[0].message for c in self.connections if c and isinstance(c[0], wire.Control)]

    def spans(self, index: int) -> list[tuple[str, str | None]]:
        """(name, parent name) of every span connection `index` sent, in order."""
        names: list[str] = []
        out = []
        for f in self.connections[index]:
            if isinstance(f, wire.Batch):
                names.extend(f.new_names)
                out += [(names[i], names[p] if p >= 0 else None) for i, p in zip(f.ids, f.parents, strict=True)]
        return out

    def ticks(self, index: int) -> int:
        return sum(len(f.ticks) for f in self.connections[index] if isinstance(f, wire.Batch))

    def by_role(self) -> dict[str, int]:
        return {c[0].message["role"]: i for i, c in enumerate(self.connections) if c}

    def summary(self) -> str:
        return repr([(h.get("role"), h.get("pid")) for h in self.hellos()])

    def close(self) -> None:
        self._closing = True
        with socket.socket(socket.AF_UNIX) as s:  # wakes the blocked accept()
            try:
                s.connect(self.path)
            except OSError:
                pass
        self._acceptor.join(5)
        self.listener.close()  # removes the socket file
        for t in self._readers:
            t.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TinyMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def python(script: str, env: dict, tmp: Path, timeout: float = 120, name: str = "script.py"):
    import subprocess

    path = tmp / name
    path.write_text(script)
    return subprocess.run([sys.executable, str(path)], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=timeout)

"""One way to run a server as a process tree: start it, wait until it is ready, stop it and every
process it started. The test suite's servers, the benchmarks, the peers and the local broker all
run through it, so that none of them leaves a process behind on the cores the next measurement
uses."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil


def _die_with_parent() -> None:
    """Run in the child before it starts: Linux sends it SIGTERM when the thread that started it
    exits, so a benchmark killed mid-run does not leave a server on the cores."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


class ProcessTree:
    """`argv` as the leader of a session of its own, its output in `log` (discarded if None).

    Its family is every descendant plus whatever is left in its session: BentoML starts each
    worker in a session of its own (found as descendants), and a server's grandchildren outlive
    a parent that exited (found by session)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.argv, self.cwd, self.env, self.log = list(argv), cwd, env, log
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ProcessTree:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        """The end of its output, for error messages."""
        if self.log is None or not self.log.exists():
            return "(no log)"
        return self.log.read_text(errors="replace")[-chars:]

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll `ready` until it holds; raise with the end of the log if the leader exits first
        or `timeout` seconds pass (the tree is stopped then)."""
        name = Path(self.argv[0]).name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None, "not started"
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {self.proc.returncode} before it was {what}; "
                    f"the end of its log ({self.log}):\n{self.tail()}"
                )
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{name} was not {what} within {timeout:.0f} s:\n{self.tail()}")

    def family(self) -> set[psutil.Process]:
        if self.proc is None:
            return set()
        found: set[psutil.Process] = set()
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update(psutil.Process(self.proc.pid).children(recursive=True))
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                if process.pid != self.proc.pid and os.getsid(process.pid) == self.proc.pid:
                    found.add(process)
        return found

    def send(self, sig: int, whole_tree: bool = False) -> None:
        """`sig` to the leader, and with `whole_tree` to every process of its family too."""
        targets = [p.pid for p in self.family()] if whole_tree else []
        for pid in [self.pid, *targets]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(
        self, sig: int = signal.SIGTERM, grace: float = 30, whole_tree: bool = False
    ) -> int | None:
        """Send `sig` (to the whole tree with `whole_tree`, always for SIGKILL: a killed leader
        takes nobody down) and give the leader `grace` seconds to exit, then SIGKILL it. What is
        left of its family gets a moment, then SIGTERM, then SIGKILL. Returns the leader's exit
        status; raises if any process of the tree survives."""
        if self.proc is None:
            return None
        family = self.family()
        if self.proc.poll() is None:
            self.send(sig, whole_tree or sig == signal.SIGKILL)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                family |= self.family()
                self.proc.kill()
                self.proc.wait()
        family |= self.family()
        _, alive = psutil.wait_procs(family, timeout=grace)
        for signal_them in ("terminate", "kill"):
            for process in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    getattr(process, signal_them)()
            _, alive = psutil.wait_procs(alive, timeout=5)
        if alive:
            raise RuntimeError(f"processes of {self.argv[0]} still run: {[p.pid for p in alive]}")
        return self.proc.returncode

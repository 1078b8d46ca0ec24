"""Run one replica's command so that nothing it starts can outlive the job.

A launcher starts every replica as ``python -I -S reaper.py --grace S --watch-fd N -- COMMAND...``.
The reaper:

- marks itself a *child subreaper*, so every orphan in its subtree (a torchrun worker whose agent
  died, an MPI rank, a process that called ``setsid``) is re-parented to it instead of to PID 1, and
  stays findable;
- watches a pipe whose write end only the launcher's process holds: end of file means that process is
  gone, however it ended (SIGKILL included), and the whole subtree is stopped;
- or, started ``--detached`` on a remote host (its launching shell exits at once), watches a lease
  file the launcher touches whenever it looks at the job: a lease older than ``--lease-timeout``
  seconds means nobody watches the job any more (the task and its retries are gone, or the host was
  cut off), and the whole subtree is stopped;
- on SIGTERM/SIGINT/SIGHUP, or when the command exits leaving processes behind, stops its subtree:
  SIGTERM, then SIGKILL after ``--grace`` seconds;
- signals through pidfds, after checking each process's start time, so a reused PID is never hit;
- exits with the command's exit status (re-raising the signal that ended it), first writing it to
  ``--exit-code-file`` if given (128 + N for signal N), for launchers that cannot wait for it.

Standard library only: it runs with the launcher's interpreter before anything else is imported, and
later on hosts that have nothing but Python. Linux only (pidfds, /proc, prctl).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

PR_SET_CHILD_SUBREAPER = 36
# After SIGKILL, how long to wait for the kernel to take processes down before reporting them.
KILL_WAIT_SECONDS = 5.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# -- the process table ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0].decode()


def _all_pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def descendants(root: int) -> dict[int, int]:
    """Every live (non-zombie) process below ``root``: pid -> start time."""
    children: dict[int, list[tuple[int, int, str]]] = {}
    for pid in _all_pids():
        if (stat := _stat(pid)) is not None:
            children.setdefault(stat[0], []).append((pid, stat[1], stat[2]))
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        for pid, started, state in children.get(frontier.pop(), []):
            if pid not in found:
                frontier.append(pid)
                if state != "Z":
                    found[pid] = started
    return found


def processes_with_environment(marker: str) -> dict[int, int]:
    """Every live process whose initial environment holds ``marker`` (``NAME=value``): pid -> start."""
    needle = marker.encode() + b"\0"
    found = {}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                held = (b"\0" + environ.read() + b"\0").find(b"\0" + needle) >= 0
        except OSError:
            continue
        stat = _stat(pid)
        if held and stat is not None and stat[2] != "Z":
            found[pid] = stat[1]
    return found


def send(processes: dict[int, int], sig: int) -> list[int]:
    """Signal each (pid, start time) that is still that same process; return the pids refused to us."""
    refused = []
    for pid, started in processes.items():
        try:
            handle = os.pidfd_open(pid)
        except OSError:
            continue  # already gone
        try:
            stat = _stat(pid)  # read after the pidfd pins the process: same start time, same process
            if stat is not None and stat[1] == started:
                signal.pidfd_send_signal(handle, sig)
        except PermissionError:
            refused.append(pid)
        except ProcessLookupError:
            pass
        finally:
            os.close(handle)
    return refused


def alive(processes: dict[int, int]) -> dict[int, int]:
    still = {}
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started and stat[2] != "Z":
            still[pid] = started
    return still


def terminate(find, grace_seconds: float, reap=lambda: None) -> list[int]:
    """SIGTERM what ``find()`` returns, SIGKILL whatever is left (or appears) after the grace, and wait
    for it to go. Returns the pids that could not be stopped (refused, or still there after waiting)."""
    send(find(), signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and find():
        reap()
        time.sleep(0.05)
    refused: set[int] = set()
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while (left := {p: s for p, s in find().items() if p not in refused}) and time.monotonic() < deadline:
        refused.update(send(left, signal.SIGKILL))
        reap()
        time.sleep(0.05)
    return sorted(refused | set(find()))


# -- the reaper process ------------------------------------------------------------------------------


@dataclass
class Options:
    grace_seconds: float = 10.0
    watch_fd: int | None = None
    detached: bool = False
    lease: str | None = None
    lease_timeout: float = 600.0
    exit_code_file: str | None = None


class Reaper:
    def __init__(self, command: list[str], options: Options) -> None:
        self.command = command
        self.grace_seconds = options.grace_seconds
        self.watch_fd = options.watch_fd
        self.options = options
        self.parent = None if options.detached else os.getppid()
        self.child: int | None = None
        self.child_status: int | None = None
        self.stop_reason: str | None = None

    def run(self) -> int:
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # delivered through the wakeup pipe
        if self.watch_fd is not None:
            os.set_inheritable(self.watch_fd, False)
        try:
            # Python ignores SIGPIPE and SIGXFSZ; the command gets the defaults back (as Popen does).
            restored = (signal.SIGPIPE, signal.SIGXFSZ)
            self.child = os.posix_spawnp(
                self.command[0], self.command, os.environ, setsigmask=(), setsigdef=restored
            )
        except OSError as error:
            print(f"dnntrain-reaper: cannot start {self.command[0]!r}: {error}", file=sys.stderr, flush=True)
            return 127
        while self.stop_reason is None:
            self._wait_for_event(wake_read)
        self._stop_subtree()
        return self._exit()

    def _wait_for_event(self, wake_read: int) -> None:
        watched = [wake_read] + ([self.watch_fd] if self.watch_fd is not None else [])
        ready, _, _ = select.select(watched, [], [], 1.0)
        if wake_read in ready:
            received = os.read(wake_read, 512)
            if any(sig in received for sig in _STOP_SIGNALS):
                self.stop_reason = "asked to stop"
        self._reap()
        watched_pipe_closed = self.watch_fd in ready and not os.read(self.watch_fd, 512)
        if watched_pipe_closed or (self.parent is not None and os.getppid() != self.parent):
            self.stop_reason = "the launching process is gone"
        if self.options.lease and self._lease_expired():
            self.stop_reason = "nobody watches the job any more (its lease expired)"
        if self.child_status is not None and self.stop_reason is None:
            self.stop_reason = "command exited"

    def _lease_expired(self) -> bool:
        try:
            age = time.time() - os.stat(self.options.lease).st_mtime
        except FileNotFoundError:
            return True
        return age > self.options.lease_timeout

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.child_status = status

    def _stop_subtree(self) -> None:
        me = os.getpid()
        if self.stop_reason == "command exited" and not descendants(me):
            return
        stuck = terminate(lambda: descendants(me), self.grace_seconds, self._reap)
        if stuck:
            print(f"dnntrain-reaper: could not stop pids {stuck}", file=sys.stderr, flush=True)
        self._reap()

    def _exit(self) -> int:
        status = self.child_status
        if status is None:  # stopped before the command ended and it would not die
            return self._report(128 + signal.SIGKILL)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            self._report(128 + sig)
            signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.kill(os.getpid(), sig)
            return 128 + sig
        return self._report(os.WEXITSTATUS(status))

    def _report(self, code: int) -> int:
        if self.stop_reason not in (None, "command exited"):
            print(f"dnntrain-reaper: stopped the command: {self.stop_reason}", file=sys.stderr, flush=True)
        if self.options.exit_code_file:
            written = self.options.exit_code_file + ".writing"
            with open(written, "w") as file:
                file.write(f"{code}\n")
            os.replace(written, self.options.exit_code_file)  # whole or absent for a reader
        return code


def _libc():
    return ctypes.CDLL(None, use_errno=True)


_USAGE = (
    "usage: reaper.py [--grace S] [--watch-fd N | --detached --lease FILE [--lease-timeout S]]"
    " [--exit-code-file FILE] -- COMMAND [ARG...]"
)


def _parse(argv: list[str]) -> tuple[Options, list[str]]:
    options = Options()
    while argv and argv[0] != "--":
        option, *argv = argv
        if option == "--detached":
            options.detached = True
            continue
        if not argv:
            raise SystemExit(_USAGE)
        value, *argv = argv
        if option == "--grace":
            options.grace_seconds = float(value)
        elif option == "--watch-fd":
            options.watch_fd = int(value)
        elif option == "--lease":
            options.lease = value
        elif option == "--lease-timeout":
            options.lease_timeout = float(value)
        elif option == "--exit-code-file":
            options.exit_code_file = value
        else:
            raise SystemExit(f"dnntrain-reaper: unknown option {option}")
    if len(argv) < 2:
        raise SystemExit(_USAGE)
    return options, argv[1:]


def main(argv: list[str]) -> int:
    options, command = _parse(argv)
    return Reaper(command, options).run()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as error:
        if error.errno == errno.ENOSYS:
            sys.exit("dnntrain-reaper: needs Linux with pidfd support (kernel 5.3+)")
        raise

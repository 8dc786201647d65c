"""Runs started as subprocesses into a run folder, and when a finished run folder is reused: what the
sweep (``flexvlm.sweep``) and the two-stage protocol (``flexvlm.protocol``) share.

A run starts by writing what it was given into its folder (``arguments.json``: each config's content,
the seed, the extra arguments, ...). A finished run is reused only if that record matches, so an
interrupted study picks up where it stopped and a changed config trains again. Whatever a folder
holds that is not reused (another record, an unfinished run, a rerun asked for) is moved into
``<folder>.old<N>`` first, and the reason is printed. The folder is locked (``run.lock``) for the
whole run, and the run's process inherits the lock: another process that meets the folder locked
waits for it, then reuses its run if the record matches, rather than training it at once too. On
Linux a run dies with the process that started it, even one killed by SIGKILL."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

RECORD = "arguments.json"  # in a run's folder: what the run was given
LOCK = "run.lock"  # in a run's folder: held by the process that trains it, and by the run
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

T = TypeVar("T")


def config_contents(files: list[str]) -> dict[str, Any]:
    """Each config's content, keyed by its place in the stack (not its path, which may be spelled
    otherwise next time)."""
    return {str(i): yaml.safe_load(Path(f).read_text()) or {} for i, f in enumerate(files)}


def written(path: str | Path) -> str | None:
    """When the file at ``path`` was last written; None if there is none."""
    return datetime.fromtimestamp(os.stat(path).st_mtime).isoformat() if os.path.isfile(path) else None


def die_with_parent(parent: int) -> None:
    """Runs in a run's process before it starts its program (Linux): the kernel kills it when the
    thread that started it ends, so that a sweep killed, even by SIGKILL, leaves no run training. A
    parent gone before this call would never send the signal: then the run ends at once."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def run_command(command: list[str], log: str, cwd: str | None = None, keep_open: tuple[int, ...] = ()) -> int:
    """One run as a subprocess started in ``cwd``, its output in ``log`` (a submitit job calls this
    too); it dies with the calling thread (on Linux) and inherits the file descriptors ``keep_open``."""
    dies_with_caller = functools.partial(die_with_parent, os.getpid()) if LIBC else None
    with open(log, "w") as f:
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, pass_fds=keep_open,
                              preexec_fn=dies_with_caller, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode


@contextmanager
def folder_lock(folder: Path, label: str) -> Iterator[int]:
    """Holds the lock of the run folder ``folder`` for the block; -> the lock file's descriptor. The
    lock goes with the processes holding it, however they end. Held by another process (another
    sweep training this run, or a run a sweep left), it is waited for rather than skipped: that run
    may be the one needed here, and it is reused once finished if its record matches."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{label}: another process holds {folder / LOCK} (a sweep or a run working in this folder): "
                  "waiting for it to end", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat |= flatten(value, name + ".") if isinstance(value, dict) and value else {name: value}
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """Each dotted key whose value differs, as "key: old -> new"."""
    old, new, unset = flatten(old), flatten(new), object()
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k, unset) != new.get(k, unset)]
    return [f"{k}: {old.get(k, 'unset')} -> {new.get(k, 'unset')}" for k in changed]


def not_reusable(folder: Path, record: dict, rerun: bool, finished: str = "metrics.json") -> str | None:
    """Why the run in ``folder`` is not the finished run of ``record`` (``finished``: the file a run
    writes last); None when it is."""
    if not (folder / finished).is_file():
        return "did not finish"
    if rerun:
        return "finished, and a rerun was asked for"
    if not (folder / RECORD).is_file():
        return f"finished without a record of what it was given ({RECORD})"
    # the record as it reads back from the file (e.g. int keys as str)
    changes = differences(json.loads((folder / RECORD).read_text()), json.loads(json.dumps(record)))
    if not changes:
        return None
    return f"finished with other arguments ({'; '.join(changes)}; configs.<i> is the i-th config stacked, 0 the base)"


def move_aside(folder: Path) -> Path:
    """Moves what ``folder`` holds, but its lock, into a new ``<folder>.old<N>``; -> that folder."""
    n = 1
    while (aside := folder.with_name(f"{folder.name}.old{n}")).exists():
        n += 1
    aside.mkdir()
    for entry in folder.iterdir():
        if entry.name != LOCK:
            entry.rename(aside / entry.name)
    return aside


def reuse_or_train(folder: Path, record: dict, label: str, train: Callable[[int], T], reuse: Callable[[], T],
                   rerun: bool = False, finished: str = "metrics.json") -> T:
    """``reuse()`` when the run in ``folder`` finished with the arguments of ``record``; else, what the
    folder held moved aside and ``record`` written, ``train(lock)``, which hands the folder's lock
    (a file descriptor) to the run's process. The lock is held throughout."""
    with folder_lock(folder, label) as lock:
        reason = not_reusable(folder, record, rerun, finished)
        if reason is None:
            print(f"{label}: finished before in {folder} with the same arguments, reused", flush=True)
            return reuse()
        if any(entry.name != LOCK for entry in folder.iterdir()):
            print(f"{label}: the run in {folder} {reason}: moved to {move_aside(folder)}, training again", flush=True)
        (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        return train(lock)

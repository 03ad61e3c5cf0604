"""Numbered tasks in, their results out: a pool of forked worker processes that die with their parent.

`run_tasks(n, work, on_done, workers, on_progress)` runs `work(i, report)` for i in 0..n-1 on `workers`
forked processes (each takes the next task number from a shared counter), calls `on_done(i, result)` in
this process as each task finishes, and relays `report(*message)` calls to `on_progress`. The first error
(raised in a worker, or a worker that dies) terminates the other workers and is raised here; the work a
task committed before that stays on disk, which is what makes a rerun resume.

Children never outlive the parent: on Linux each worker asks the kernel for SIGKILL when its parent dies
(`prctl(PR_SET_PDEATHSIG)`), and everywhere it also stops at its next progress report once its parent is
gone. Fork (not spawn) keeps start-up free of re-imports; this process starts no thread before forking.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import pickle
import signal
from multiprocessing.connection import wait
from typing import Any, Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl (not Linux): the getppid() checks below still stop the worker
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker(parent: int, counter, total: int, work: Callable, conn, close_fds: tuple[int, ...]) -> None:
    _die_with_parent(parent)
    for fd in close_fds:  # e.g. the output lock: only the parent may hold it
        os.close(fd)

    def report(*message: Any) -> None:
        if os.getppid() != parent:
            os._exit(1)
        conn.send(("progress", message))

    while True:
        with counter.get_lock():
            task = counter.value
            counter.value += 1
        if task >= total:
            conn.send(("exit", None))
            return
        try:
            result = work(task, report)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 - an unpicklable error still reaches the parent as text
                e = ValueError(f"{type(e).__name__}: {e}")
            conn.send(("error", (task, e)))
            return
        conn.send(("done", (task, result)))


def run_tasks(total: int, work: Callable[[int, Callable], Any], on_done: Callable[[int, Any], None], *,
              workers: int, on_progress: Callable[..., None] | None = None,
              close_fds: tuple[int, ...] = ()) -> None:
    """Run `work(task, report)` for every task in 0..total-1 on `workers` forked processes (see module doc)."""
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    procs, conns = [], []
    # The workers inherit this process's objects frozen: their collections then never walk (nor copy-on-write
    # copy the pages of) the objects from before the fork (the `gc.freeze` recipe). A caller that froze its
    # own objects keeps them frozen; otherwise this process unfreezes once the workers are started.
    unfreeze = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        try:
            for _ in range(min(workers, total)):
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(os.getpid(), counter, total, work, send, close_fds),
                                   daemon=True)
                proc.start()
                send.close()
                procs.append(proc)
                conns.append(receive)
        finally:
            if unfreeze:
                gc.unfreeze()
        live = dict(zip(conns, procs))
        while live:
            for ready in wait(list(live) + [p.sentinel for p in live.values()]):
                conn = ready if ready in live else next((c for c, p in live.items() if p.sentinel == ready), None)
                if conn is None:
                    continue
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    proc = live.pop(conn)
                    proc.join()
                    raise OSError(f"a conversion worker (pid {proc.pid}) died with exit code {proc.exitcode}")
                if kind == "progress" and on_progress is not None:
                    on_progress(*payload)
                elif kind == "done":
                    on_done(*payload)
                elif kind == "error":
                    raise payload[1]
                elif kind == "exit":
                    live.pop(conn).join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()

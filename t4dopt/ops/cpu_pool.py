"""Worker threads that run the independent parts of one CPU op call, each part on one intra-op thread.

Why not torch's own intra-op parallelism: the CPU kernel is many short calls (one per piece of
the block table, and the merges between them). Each such call splits its work statically over
torch's OpenMP threads and waits at a barrier for the slowest; when another process keeps a core
busy, the OS deschedules one of those threads at almost every call, and the op ran five times
slower than dense SDPA (one long call, which loses only that core's share). Here each worker
thread runs whole parts with ``torch.set_num_threads(1)`` (no barrier), takes the next part when
it is done, and a descheduled worker delays only the part it holds. torch releases the GIL inside
its kernels, so the workers run in parallel; the Python between kernels is short.

The calling thread waits while the workers run its parts. The parts are kernel code: they run
without autograd (as the op's kernel runs below it on the calling thread), and in the caller's
inference mode (thread-local state that in-place updates of its tensors must agree with). One
pool serves the process (`pool`); `WorkerPool.reset` forgets its threads, which a fork does not copy.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence

import torch

Task = Callable[[], None]


class _Call:
    """The tasks of one `WorkerPool.run`: handed out in order, the first error kept, done when all ran."""

    def __init__(self, tasks: Sequence[Task], runners: int) -> None:
        self.tasks = tasks
        self.inference_mode = torch.is_inference_mode_enabled()
        self._next = 0
        self._runners = runners
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None

    def take(self) -> Task | None:
        with self._lock:
            if self._next >= len(self.tasks) or self.error is not None:
                return None
            self._next += 1
            return self.tasks[self._next - 1]

    def run(self) -> None:
        """One runner: run tasks until none is left, then count itself out."""
        try:
            with torch.inference_mode(self.inference_mode), torch.no_grad():
                while (task := self.take()) is not None:
                    task()
        except BaseException as error:  # handed to the caller, which raises it
            with self._lock:
                self.error = self.error or error
        finally:
            with self._lock:
                self._runners -= 1
                if self._runners == 0:
                    self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class WorkerPool:
    """Daemon threads with one torch intra-op thread each; `run` spreads a call's tasks over them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the threads (after a fork, the child has none of them); new ones start on demand."""
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def size(self) -> int:
        return len(self._threads)

    def run(self, tasks: Sequence[Task], workers: int) -> None:
        """Run `tasks` (independent of each other) on at most `workers` threads; return when all ran.

        With one worker, or one task, they run here, on the calling thread and its intra-op threads.
        The first error a task raises is raised here (tasks not yet started are dropped).
        """
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                task()
            return
        runners = min(workers, len(tasks))
        self._grow(runners)
        call = _Call(tasks, runners)
        for _ in range(runners):
            self._queue.put(call)
        call.wait()

    def _grow(self, size: int) -> None:
        with self._lock:
            if len(self._threads) >= size:
                return
            # torch.set_num_threads in a worker sets its own OpenMP thread count, and also the
            # process-wide default that threads started later take: the caller's is put back.
            callers_threads = torch.get_num_threads()
            started = threading.Barrier(size - len(self._threads) + 1)
            for _ in range(size - len(self._threads)):
                thread = threading.Thread(target=self._work, args=(self._queue, started),
                                          name=f"t4dopt-cpu-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
            started.wait()
            torch.set_num_threads(callers_threads)

    @staticmethod
    def _work(tasks: queue.SimpleQueue[_Call], started: threading.Barrier) -> None:
        # torch sets a thread's OpenMP thread count from the process-wide default the first time the
        # thread asks for it: ask first, so that this later call is the one that stays.
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()
        while True:
            tasks.get().run()


pool = WorkerPool()
os.register_at_fork(after_in_child=pool.reset)

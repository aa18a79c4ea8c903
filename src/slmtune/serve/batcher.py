"""The embedded engine's queue: one worker thread, one batch at a time (a 2-core CPU gains nothing from two
models generating at once). It takes the checkpoint of the oldest waiting request, waits until that request is
`window_s` old (or `max_batch` requests for that checkpoint wait), and hands all of them to `run` as one batch.
Requests that arrive while a batch runs form the next one, so under load batches fill without any waiting.
Cancelled requests never start; requests past their deadline before their batch starts fail with `TimeoutError`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from slmtune.serve.jobs import Job, JobQueue


class Batcher(JobQueue):
    def __init__(self, run: Callable[[list[Job]], None], window_s: float, max_batch: int):
        super().__init__()
        self.run, self.window_s, self.max_batch = run, window_s, max_batch
        self._worker = threading.Thread(target=self._loop, name="slmtune-engine", daemon=True)
        self._worker.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._cond.notify_all()
        self._worker.join(timeout=30)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled.is_set() and j.future.set_running_or_notify_cancel()]
            late = [j for j in live if time.monotonic() > j.deadline]  # timed out while waiting its turn
            for j in late:
                j.future.set_exception(TimeoutError("the request timed out before its batch started"))
            live = [j for j in live if j not in late]
            if live:
                self.run(live)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting request's checkpoint: every request for it, once the oldest is a window old."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._pending[0]
                same = [j for j in self._pending if j.ckpt.name == first.ckpt.name]
                wait = first.arrived + self.window_s - time.monotonic()
                if wait <= 0 or len(same) >= self.max_batch:
                    batch = same[:self.max_batch]
                    taken = {id(j) for j in batch}
                    self._pending = [j for j in self._pending if id(j) not in taken]
                    return batch
                self._cond.wait(wait)

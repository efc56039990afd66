"""Dynamic batching: requests that arrive together share one ``generate`` call.

One asyncio task takes the first waiting request, then gathers more for up to ``wait_ms`` or until ``max_batch``
are in hand, groups them by sampling settings (a seeded sampled request runs alone, so its seed alone decides its
answer), and runs each group in a single worker thread, so the event loop keeps answering while the model works.
Requests that arrive during a generation wait in the queue and form the next batch. ``max_batch=1`` is the
unbatched baseline: one request per call, in arrival order.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from vlmtune.serve.engine import Completion, Engine, Job


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 8, wait_ms: float = 10.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine, self.max_batch, self.wait = engine, max_batch, wait_ms / 1000
        self.queue: asyncio.Queue[tuple[Job, asyncio.Future]] | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vlmtune-generate")
        self.batch_sizes: Counter[int] = Counter()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="vlmtune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, job: Job) -> Completion:
        """Queues a job and waits for its completion."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((job, future))
        return await future

    def stats(self) -> dict:
        return {
            "max_batch": self.max_batch,
            "wait_ms": self.wait * 1000,
            "queued": self.queue.qsize() if self.queue is not None else 0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    async def _gather(self) -> list[tuple[Job, asyncio.Future]]:
        pending = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while len(pending) < self.max_batch:
            if not self.queue.empty():
                pending.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                pending.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return pending

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = await self._gather()
            for group in _groups(pending):
                live = [(job, future) for job, future in group if not future.done()]  # a client may have left
                if not live:
                    continue
                self.batch_sizes[len(live)] += 1
                try:
                    results = await loop.run_in_executor(self.executor, self.engine.run, [job for job, _ in live])
                except Exception as e:  # a failed generate fails its requests, not the server
                    for _, future in live:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), result in zip(live, results):
                    if not future.done():
                        future.set_result(result)


def _groups(pending: list[tuple[Job, asyncio.Future]]) -> list[list[tuple[Job, asyncio.Future]]]:
    """Jobs with equal sampling settings together, in order of their first arrival; seeded sampled jobs alone."""
    groups: dict[object, list] = {}
    for i, (job, future) in enumerate(pending):
        s = job.sampling
        if s.greedy:
            key: object = "greedy"
        elif s.seed is None:
            key = (s.temperature, s.top_p)
        else:
            key = ("alone", i)
        groups.setdefault(key, []).append((job, future))
    return list(groups.values())

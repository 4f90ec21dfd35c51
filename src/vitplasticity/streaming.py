"""Training batches gathered ahead of the step, off the training thread.

A split too large to keep on the device stays a memory-mapped uint8 array on the host, and each
step gathers its batch from it (fancy indexing copies B images out of the map). Done on the
training thread, the device waits for every gather. `Prefetcher` runs the gathers of the next
steps on one worker thread (numpy releases the GIL while it copies), and `host_gather` makes each
gather land in pinned (page-locked) memory and start its copy to the GPU on a side CUDA stream, so
a step finds its images already on the device. The batches are the same with or without the
prefetcher; only when they are gathered changes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, H, W, 3), int64 labels (B,), on the device


def host_gather(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Callable[[np.ndarray], Batch]:
    """A function taking batch indices (B,) to that batch's images and labels on `device`.

    On CUDA the images are gathered into one reused pinned buffer and copied on a side stream; the
    call returns once the copy has finished, so the buffer is free for the next gather, and the
    device tensors are marked as used by the caller's stream (their memory is not recycled while
    that stream may still read them). Elsewhere the gather is a plain copy out of the array.
    """
    if device.type != "cuda":
        def gather_host(index: np.ndarray) -> Batch:
            return torch.from_numpy(images[index]), torch.from_numpy(np.asarray(labels[index], dtype=np.int64))
        return gather_host

    copy_stream = torch.cuda.Stream(device)
    consumer = torch.cuda.current_stream(device)
    buffers: dict[int, torch.Tensor] = {}  # batch size → pinned (B, H, W, 3) uint8

    def gather_cuda(index: np.ndarray) -> Batch:
        pinned = buffers.get(len(index))
        if pinned is None:
            pinned = buffers[len(index)] = torch.empty((len(index), *images.shape[1:]), dtype=torch.uint8,
                                                       pin_memory=True)
        np.take(images, index, axis=0, out=pinned.numpy(), mode="wrap")  # in range; "raise" would buffer a copy
        target = torch.from_numpy(np.asarray(labels[index], dtype=np.int64)).pin_memory()
        with torch.cuda.stream(copy_stream):
            batch = (pinned.to(device, non_blocking=True), target.to(device, non_blocking=True))
        copy_stream.synchronize()
        for tensor in batch:
            tensor.record_stream(consumer)
        return batch

    return gather_cuda


class Prefetcher:
    """Calls `fetch(step)` for the steps of `steps`, up to `depth` of them ahead, on one worker thread.

    `get(step)` returns `fetch(step)` and queues the next step's fetch; steps must be asked for in
    order. An exception raised by `fetch` is raised again by the `get` of its step. Use as a context
    manager, or call `close`, so the worker stops with the loop (a diverged run breaks out early).
    """

    def __init__(self, fetch: Callable[[int], Batch], steps: range, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._fetch, self._steps, self._depth = fetch, steps, depth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitplasticity-prefetch")
        self._pending: dict[int, Future] = {}
        self._next = 0  # position in `steps` of the next fetch to queue
        for _ in range(depth):
            self._queue()

    def _queue(self) -> None:
        if self._next < len(self._steps):
            step = self._steps[self._next]
            self._pending[step] = self._executor.submit(self._fetch, step)
            self._next += 1

    def get(self, step: int) -> Batch:
        future = self._pending.pop(step, None)
        if future is None:
            raise KeyError(f"step {step} was not prefetched; steps are fetched in the order of {self._steps}")
        self._queue()
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

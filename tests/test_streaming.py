"""Batches gathered ahead on a worker thread: same batches, same results, errors and early stops handled."""

import threading

import numpy as np
import pytest
import torch
from helpers import tiny_vit

from vitplasticity import components, streaming
from vitplasticity.datasets.synthetic import generate
from vitplasticity.prepared import Split
from vitplasticity.training import TrainConfig, batch_indices, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Train images in a memory-mapped file, as prepared splits are stored (so training streams them)."""
    folder = tmp_path_factory.mktemp("streamed")
    out = {}
    for split, count in (("train", 48), ("val", 16), ("test", 16)):
        images, labels, _ = generate("shapes", "source", split, count, 16, seed=0)
        path = folder / f"{split}.npy"
        np.save(path, images)
        out[split] = Split(np.load(path, mmap_mode="r"), labels)
    return out


def _train(splits, prefetch: int, steps: int = 6):
    model = tiny_vit(img_size=16, depth=1)
    components.set_trainable(model, ["mha"])
    cfg = TrainConfig(steps=steps, eval_every=3, batch_size=16, lr=0.05, seed=3, img_size=16, warmup_steps=1,
                      eval_batch=16, prefetch=prefetch)
    return train(model, splits, cfg, CPU, progress=lambda _: None)


def test_training_with_the_prefetcher_gives_identical_metrics(splits):
    assert isinstance(splits["train"].images, np.memmap)
    without = _train(splits, prefetch=0)
    with_two = _train(splits, prefetch=2)
    with_five = _train(splits, prefetch=5)  # deeper than the evaluation period
    assert without == with_two == with_five
    assert [row["step"] for row in with_two.history] == [1, 2, 3, 4, 5, 6]


def test_host_gather_returns_the_batch_of_those_indices(splits):
    images, labels = splits["train"].images, splits["train"].labels
    index = batch_indices(len(labels), 16, step=4, seed=3)
    got_images, got_labels = streaming.host_gather(images, labels, CPU)(index)
    assert got_images.dtype == torch.uint8 and got_images.shape == (16, 16, 16, 3)
    assert torch.equal(got_images, torch.from_numpy(np.asarray(images)[index]))
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == np.asarray(labels)[index].tolist()


def test_prefetcher_runs_ahead_on_another_thread_in_step_order():
    calls: list[tuple[int, str]] = []

    def fetch(step):
        calls.append((step, threading.current_thread().name))
        return torch.tensor([step]), torch.tensor([step])

    with streaming.Prefetcher(fetch, range(3, 8), depth=2) as prefetcher:
        assert prefetcher.get(3)[0].item() == 3
        assert [prefetcher.get(step)[0].item() for step in range(4, 8)] == [4, 5, 6, 7]
    assert [step for step, _ in calls] == [3, 4, 5, 6, 7]
    assert all(name.startswith("vitplasticity-prefetch") for _, name in calls)


def test_prefetcher_reraises_the_fetch_error_at_its_step_and_refuses_unqueued_steps():
    def fetch(step):
        if step == 2:
            raise OSError("disk gone")
        return torch.tensor([step]), torch.tensor([step])

    with streaming.Prefetcher(fetch, range(0, 5), depth=1) as prefetcher:
        prefetcher.get(0)
        prefetcher.get(1)
        with pytest.raises(OSError, match="disk gone"):
            prefetcher.get(2)
        with pytest.raises(KeyError, match="step 4 was not prefetched"):
            prefetcher.get(4)


def test_closing_early_stops_the_worker():
    started = threading.Event()

    def fetch(step):
        started.set()
        return torch.tensor([step]), torch.tensor([step])

    prefetcher = streaming.Prefetcher(fetch, range(1000), depth=3)
    prefetcher.get(0)
    prefetcher.close()
    assert started.is_set()
    assert not any(t.name.startswith("vitplasticity-prefetch") and t.is_alive() for t in threading.enumerate())

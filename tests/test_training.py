"""The training loop: frozen weights stay put, runs repeat, resume, divergence and accumulation."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import tiny_vit

from vitplasticity import components, training
from vitplasticity.datasets.synthetic import generate
from vitplasticity.errors import UserError
from vitplasticity.prepared import Split
from vitplasticity.training import Result, TrainConfig, batch_indices, config_record, train

CPU = torch.device("cpu")
QUIET = {"progress": lambda _: None}
SMALL = {"img_size": 16, "depth": 1}


@pytest.fixture(scope="module")
def splits():
    out = {}
    for split, count in (("train", 48), ("val", 16), ("test", 16)):
        images, labels, _ = generate("shapes", "source", split, count, 16, seed=0)
        out[split] = Split(images, labels)
    return out


def _config(**changes):
    base = {"steps": 4, "eval_every": 2, "batch_size": 16, "lr": 0.05, "seed": 0, "img_size": 16,
            "warmup_steps": 1, "eval_batch": 16}
    return TrainConfig(**{**base, **changes})


def _model(arm=("mha",)):
    model = tiny_vit(**SMALL)
    components.set_trainable(model, list(arm))
    return model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_frozen_parameters_are_bit_identical_after_training(splits):
    model = _model(("ln1",))
    before = _snapshot(model)
    result = train(model, splits, _config(), CPU, **QUIET)
    assert result.status == "completed"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert "blocks.0.norm1.weight" in changed and "head.weight" in changed
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name


def test_same_seed_gives_identical_results(splits):
    first = train(_model(), splits, _config(), CPU, **QUIET)
    second = train(_model(), splits, _config(), CPU, **QUIET)
    assert first == second
    assert first.history and first.test_acc is not None
    third = train(_model(), splits, _config(seed=1), CPU, **QUIET)
    assert [r["loss"] for r in third.history] != [r["loss"] for r in first.history]


def test_result_fields_and_history(splits):
    result = train(_model(), splits, _config(), CPU, **QUIET)
    assert (result.status, result.steps_done, result.diverged_step) == ("completed", 4, None)
    assert [row["step"] for row in result.history] == [1, 2, 3, 4]
    evals = [row for row in result.history if "val_acc" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert result.best_val_acc == max(row["val_acc"] for row in evals)
    assert result.best_step in (2, 4)
    assert 0.0 <= result.test_acc <= 1.0 and result.test_loss > 0
    assert result.history[0]["lr"] == pytest.approx(0.05)  # 1 warm-up step reaches the peak at step 0
    assert set(result.history[1]) == set(training.HISTORY_COLUMNS)
    # Accuracies are multiples of 1/16 (16 validation and test images).
    assert result.best_val_acc * 16 == pytest.approx(round(result.best_val_acc * 16))
    assert result.test_acc * 16 == pytest.approx(round(result.test_acc * 16))


def test_test_accuracy_is_taken_at_the_best_validation_step(splits):
    model = _model()
    result = train(model, splits, _config(), CPU, **QUIET)
    loss, acc = training.evaluate(model, splits["test"], _config(), CPU)  # the model holds the best state now
    assert (result.test_loss, result.test_acc) == (pytest.approx(loss), acc)
    val_loss, val_acc = training.evaluate(model, splits["val"], _config(), CPU)
    assert val_acc == result.best_val_acc
    best_row = next(r for r in result.history if r["step"] == result.best_step)
    assert val_loss == pytest.approx(best_row["val_loss"], rel=1e-5)


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_the_uninterrupted_result(splits, tmp_path):
    cfg = _config(steps=5, eval_every=2)
    uninterrupted = train(_model(), splits, cfg, CPU, **QUIET)

    state = tmp_path / "state.pt"
    seen = []

    def crash_after_first_eval(rows):
        seen.extend(rows)
        raise Interrupted

    with pytest.raises(Interrupted):
        train(_model(), splits, cfg, CPU, state_path=state, on_eval=crash_after_first_eval, **QUIET)
    assert state.exists() and [r["step"] for r in seen] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # written atomically, no temporary left

    reported = []
    resumed = train(_model(), splits, cfg, CPU, state_path=state, on_eval=reported.extend, **QUIET)
    assert resumed == uninterrupted
    assert (resumed.test_acc, resumed.best_val_acc, resumed.history) == (
        uninterrupted.test_acc, uninterrupted.best_val_acc, uninterrupted.history)
    assert [r["step"] for r in reported] == [3, 4, 5]  # only the rows after the resume point


def test_unreadable_state_is_a_user_error(splits, tmp_path):
    state = tmp_path / "state.pt"
    state.write_bytes(b"half a file")
    with pytest.raises(UserError, match="state.pt is unreadable .*delete it to restart the run"):
        train(_model(), splits, _config(), CPU, state_path=state, **QUIET)


def test_nan_loss_stops_the_run_as_diverged(splits):
    model = _model()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    result = train(model, splits, _config(), CPU, **QUIET)
    assert result.status == "diverged"
    assert (result.diverged_step, result.steps_done) == (1, 1)
    assert result.test_acc is None and result.test_loss is None
    assert len(result.history) == 1 and math.isnan(result.history[0]["loss"])


def test_loss_turning_nan_later_stops_at_that_step(splits):
    """A forward hook poisons the logits of the third training step's batch."""
    model = _model()
    calls = []

    def poison(module, inputs, output):
        if module.training:
            calls.append(1)
            if len(calls) == 3:
                return output * float("inf")
        return output

    model.head.register_forward_hook(poison)
    reported = []
    result = train(model, splits, _config(steps=4, eval_every=2), CPU, on_eval=reported.extend, **QUIET)
    assert (result.status, result.diverged_step, result.steps_done) == ("diverged", 3, 3)
    assert [row["step"] for row in result.history] == [1, 2, 3]
    assert not math.isfinite(result.history[-1]["loss"]) and math.isnan(result.history[-1]["grad_norm"])
    assert result.best_step == 2 and result.best_val_acc == result.history[1]["val_acc"]
    assert reported == result.history  # the rows since the last eval are reported too


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": 0}, "steps must be positive, got 0"),
    ({"steps": -3, "eval_every": 1}, "steps must be positive, got -3"),
    ({"eval_every": 10}, r"eval_every must be in 1..steps \(4\), got 10"),
    ({"eval_every": 0}, r"eval_every must be in 1..steps \(4\), got 0"),
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"lr": float("nan")}, "lr must be a positive number, got nan"),
    ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' unknown; allowed: sgd, adamw"),
    ({"micro_batch": 32}, r"micro_batch must be in 1..batch_size \(16\), got 32"),
])
def test_config_check_names_the_key(changes, message):
    with pytest.raises(UserError, match=message):
        _config(**changes)


def test_bad_config_fails_before_training(splits):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(UserError, match="eval_every"):
        train(model, splits, _config(eval_every=5), CPU, **QUIET)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_micro_batches_accumulate_to_the_full_batch_gradient(splits):
    cfg = _config(steps=2, eval_every=2)
    full = train(_model(), splits, cfg, CPU, **QUIET)
    for micro in (4, 5):  # 5 leaves a ragged last micro-batch of 1
        accumulated = train(_model(), splits, dataclasses.replace(cfg, micro_batch=micro), CPU, **QUIET)
        for a, b in zip(full.history, accumulated.history, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], abs=1e-5)
        assert accumulated.history[-1]["val_loss"] == pytest.approx(full.history[-1]["val_loss"], abs=1e-5)


def test_adamw_trains(splits):
    model = _model()
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    result = train(model, splits, _config(optimizer="adamw", lr=1e-3), CPU, **QUIET)
    assert result.status == "completed"
    # AdamW's first step moves every weight with a gradient by about lr.
    moved = (model.blocks[0].attn.qkv.weight - before).abs()
    assert 1e-4 < moved.max().item() < 1e-2


def test_batch_indices_are_seeded_epochs():
    first = batch_indices(20, 5, step=0, seed=3)
    assert np.array_equal(first, batch_indices(20, 5, step=0, seed=3))
    epoch = np.concatenate([batch_indices(20, 5, step=s, seed=3) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch sees every sample once
    assert not np.array_equal(batch_indices(20, 5, step=4, seed=3), first)  # the next epoch reshuffles
    assert not np.array_equal(batch_indices(20, 5, step=0, seed=4), first)
    small = batch_indices(3, 8, step=0, seed=0)  # fewer samples than a batch: wrap around
    assert len(small) == 8 and set(small.tolist()) == {0, 1, 2}


def test_config_record_is_plain_data():
    record = config_record(_config(betas=(0.8, 0.9)))
    assert record["betas"] == [0.8, 0.9] and record["mean"] == [0.485, 0.456, 0.406]
    assert record["steps"] == 4 and record["optimizer"] == "sgd"


def test_result_is_a_dataclass_with_the_documented_fields():
    assert [f.name for f in dataclasses.fields(Result)] == [
        "status", "best_val_acc", "best_step", "test_acc", "test_loss", "diverged_step", "steps_done", "history"]


def test_a_history_is_written_as_pandas_writes_it(tmp_path):
    """Jobs write history.csv without pandas (start-up time); readers and the old files expect its format."""
    import pandas as pd

    from vitplasticity.fileio import write_rows

    history = [{"step": 1, "loss": 0.1 + 0.2, "lr": 0.005, "grad_norm": float("nan")},
               {"step": 2, "loss": 1e-12, "lr": 0.01, "grad_norm": float("inf"), "val_loss": None, "val_acc": 0.5},
               {"step": 3, "loss": 2.0, "lr": 0.0025000000000000014, "grad_norm": 1.5, "val_loss": 0.25,
                "val_acc": 1.0}]
    write_rows(tmp_path / "ours.csv", history, training.HISTORY_COLUMNS)
    pd.DataFrame(history, columns=list(training.HISTORY_COLUMNS)).to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "ours.csv").read_text() == (tmp_path / "pandas.csv").read_text()
    assert (tmp_path / "ours.csv").read_text().splitlines()[1] == "1,0.30000000000000004,0.005,,,"


def _update_norm(before: dict, after: dict) -> float:
    """Euclidean norm of the change of every parameter, taken together (float64)."""
    return math.sqrt(sum(((after[n].double() - before[n].double()) ** 2).sum().item() for n in before))


def test_plain_sgd_step_moves_the_weights_by_lr_times_the_clip_norm(splits):
    """Clipping to 0.01 a gradient of norm well above it: one plain-SGD step at lr 0.5 moves the trainable
    weights by exactly 0.5 x 0.01 = 0.005 (torch scales the gradient by clip / (norm + 1e-6))."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = _config(steps=1, eval_every=1, lr=0.5, warmup_steps=0, momentum=0.0, clip_norm=0.01)
    result = train(model, splits, cfg, CPU, **QUIET)
    assert result.history[0]["lr"] == 0.5  # one step without warm-up: the cosine at progress 0
    assert result.history[0]["grad_norm"] > 1.0  # the raw gradient is 100 times the clip norm at least
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert _update_norm(before, after) == pytest.approx(0.005, rel=1e-3)


def test_each_step_applies_the_scheduled_learning_rate(splits):
    """1 warm-up step of 5 at lr 1: the schedule gives 1, then the cosine over 4 steps 1, (2 + sqrt 2) / 4,
    1/2, (2 - sqrt 2) / 4. With plain SGD and every gradient clipped to norm 0.01, step k moves the weights
    by exactly lr_k x 0.01, so the update norms show the learning rate the optimizer used."""
    expected = [1.0, 1.0, (2 + math.sqrt(2)) / 4, 0.5, (2 - math.sqrt(2)) / 4]
    model = _model()
    weights = [{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}]

    def snapshot(rows):
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    cfg = _config(steps=5, eval_every=1, lr=1.0, warmup_steps=1, momentum=0.0, clip_norm=0.01)
    result = train(model, splits, cfg, CPU, on_eval=snapshot, **QUIET)
    assert [row["lr"] for row in result.history] == pytest.approx(expected)
    assert all(row["grad_norm"] > 0.1 for row in result.history)  # every step is clipped
    moved = [_update_norm(a, b) for a, b in zip(weights, weights[1:], strict=False)]
    assert moved == pytest.approx([0.01 * lr for lr in expected], rel=1e-3)

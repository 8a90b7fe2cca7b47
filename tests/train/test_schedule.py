"""Recipes: warm-up + cosine, the weight average, the time budget; the official recipe stays the official one."""

import json
import re
import time

import pytest
import torch

from reconad.runtime.config import decode
from reconad.model import load_detector
from reconad.train.config import TrainConfig
from reconad.train.fit import fit
from reconad.train.schedule import Budget, WarmupCosine, WeightAverage, build_optimizer, split_holdout
from tests.train.conftest import tiny_train_config


def test_recipes_resolve_per_preset_and_explicit_values_win():
    official = TrainConfig(preset="tiny", epochs=1000)
    assert (official.schedule, official.learning_rate, official.ema_decay, official.batch_size) == ("step", 1e-4, 0.0, 8)
    _, scheduler = build_optimizer(torch.nn.Linear(1, 1), official)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 800
    budget = TrainConfig(preset="lite0-256")
    assert budget.schedule == "cosine" and budget.learning_rate == 5e-4 and budget.ema_decay == 0
    assert TrainConfig(preset="lite0-256", recipe="official").schedule == "step"  # --recipe official: parity
    assert TrainConfig(preset="lite0-256", learning_rate=3e-3).learning_rate == 3e-3
    assert decode(TrainConfig, budget.to_dict(), "config.json") == budget  # config.json gives the same run back


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    schedule = WarmupCosine(optimizer, steps_per_epoch=10, warmup_epochs=1, total_epochs=5)
    rates = []
    for _ in range(50):
        rates.append(schedule.get_last_lr()[0])
        schedule.step()
    assert rates[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert rates[10] == pytest.approx(1.0) and rates[30] == pytest.approx(0.5)  # the cosine's middle
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and schedule.get_last_lr()[0] == pytest.approx(0)
    schedule.set_total_epochs(9)  # a budget re-plan moves the rest of the curve, not the steps taken
    assert schedule.get_last_lr()[0] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 40 / 80)).item()))
    state = schedule.state_dict()
    again = WarmupCosine(optimizer, 10, 1, 5)
    again.load_state_dict(state)
    assert again.get_last_lr() == schedule.get_last_lr()


def test_weight_average_is_the_warmed_up_exponential_average():
    module = torch.nn.Linear(2, 1, bias=False)
    average = WeightAverage(module, decay=0.9)
    expected = module.weight.detach().clone()  # the first update copies
    for t in range(6):
        with torch.no_grad():
            module.weight.add_(1.0)
        average.update(module)
        if t == 0:
            expected = module.weight.detach().clone()
        else:
            d = min(0.9, (1 + t) / (10 + t))
            expected = expected + (module.weight.detach() - expected) * (1 - d)
    own = module.weight.detach().clone()
    with average.applied(module):
        torch.testing.assert_close(module.weight.detach(), expected)
    torch.testing.assert_close(module.weight.detach(), own)  # its own weights come back


def test_budget_plans_the_epochs_that_fit():
    budget = Budget(minutes=1.0, started=time.perf_counter() - 10, max_epochs=100)  # 10 s used
    assert budget.planned_epochs(0) == 100  # nothing measured yet
    budget.record(20.0)
    assert budget.planned_epochs(1) == 1 + 2  # 50 s left, 20 s an epoch
    budget.exclude(30.0)  # e.g. a benchmark's evaluations: not counted
    assert budget.planned_epochs(1) == 1 + 3
    assert Budget(0, 0.0, 7).planned_epochs(3) == 7  # no budget


def test_split_holdout_is_per_category_and_disjoint():
    categories = ["a"] * 10 + ["b"] * 4
    keep, held = split_holdout(categories, [str(i) for i in range(14)], 0.2, seed=0)
    assert len(held) == 2 + 1 and not set(keep) & set(held) and len(keep) + len(held) == 14
    with pytest.raises(Exception, match="at least 2"):
        split_holdout(["a"], ["x"], 0.5, 0)


def test_fit_stops_at_the_time_budget_with_a_valid_checkpoint(sample_data_root, tmp_path):
    config = tiny_train_config(epochs=50, minutes=0.001, recipe="budget", learning_rate=1e-3, ema_decay=0.9)  # 60 ms
    result = fit(sample_data_root, tmp_path / "run", config)
    assert result.stopped_by_budget and 1 <= result.epochs_trained < 50
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, result.epochs_trained + 1))
    assert all("minutes" in r and "planned_epochs" in r for r in log)
    detector = load_detector(result.checkpoint)
    assert detector.provenance["stopped_by_budget"] and detector.provenance["epoch"] == result.epochs_trained
    # the checkpoint holds the weight average (--ema-decay), as the returned detector does
    for saved, returned in zip(detector.reconstructor.parameters(), result.detector.reconstructor.parameters()):
        torch.testing.assert_close(saved, returned.cpu(), rtol=0, atol=0)


def test_the_eta_under_a_time_budget_is_the_budgets(sample_data_root, tmp_path, capsys):
    """`fit --minutes 1` printed "run: 1/1000 epochs ..., 4:0x:xx left" after epoch 1: the plan was re-fitted to
    the budget only before the next epoch, so the first ETA was the 1000 epochs' of --epochs."""
    from reconad.runtime.progress import configure

    configure(quiet=False)
    minutes = 0.05  # 3 s for the whole fit, feature caching included: one epoch or a few, by the load
    result = fit(sample_data_root, tmp_path / "run", tiny_train_config(epochs=1000, minutes=minutes))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run: ")]
    assert len(lines) == max(0, result.epochs_trained - 1), lines  # after every epoch but the last
    for line in lines:
        match = re.fullmatch(r"run: \d+/(\d+) epochs after [\d:]+, (\d+):(\d\d):(\d\d) left", line)
        planned, hours, mins, secs = (int(group) for group in match.groups())
        assert planned < 1000 and 3600 * hours + 60 * mins + secs <= minutes * 60 + 1, line


def test_resume_restores_the_schedule_and_the_average(sample_data_root, tmp_path):
    # a warm-up over both epochs: the schedule then does not depend on the planned total (1 or 2 epochs)
    config = dict(recipe="budget", learning_rate=1e-3, warmup_epochs=2, ema_decay=0.5)
    assert TrainConfig(preset="tiny", **config).schedule == "cosine"
    straight = fit(sample_data_root, tmp_path / "straight", tiny_train_config(epochs=2, **config))
    fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=1, keep_resume=True, **config))
    resumed = fit(sample_data_root, tmp_path / "split", tiny_train_config(epochs=2, **config), resume=True)
    for a, b in zip(straight.detector.reconstructor.parameters(), resumed.detector.reconstructor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

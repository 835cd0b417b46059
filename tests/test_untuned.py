"""The untuned model beside every result: fit scores it before the first step and compares the best epoch
with it (paired bootstrap interval), a resume keeps the first start's score, test reports it beside the
checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segtune.cli import DEFAULTS
from segtune.paired import paired_difference, paired_rows
from tests.conftest import CONFIGS, metrics_rows

QUICKSTART = CONFIGS / "quickstart.yaml"
SUMMARY = re.compile(
    r"untuned val_dice ([0-9.]+) -> best ([0-9.]+) \(epoch (\d+)\): ([+-][0-9.]+) "
    r"\[95% CI ([+-][0-9.]+), ([+-][0-9.]+)\] over (\d+) validation instances"
)
BEST = re.compile(r"Best checkpoint \(val_dice=([0-9.]+)\): (\S+)")


def _instances(root: Path, split: str) -> int:
    return len(json.loads((root / split / "_annotations.coco.json").read_text())["annotations"])


# --- the bootstrap ---------------------------------------------------------------------------------------
def test_paired_bootstrap_on_hand_checkable_inputs() -> None:
    before = {i: 0.5 for i in range(10)}
    # the same shift on every instance: every resample has the same mean, so the interval is that shift
    shifted = paired_difference(before, {i: 0.6 for i in range(10)})
    assert (shifted.mean, shifted.low, shifted.high, shifted.instances) == pytest.approx((0.1, 0.1, 0.1, 10))
    # one instance of ten gained 1: the resampled mean is k/10 with k ~ Binomial(10, 0.1), whose
    # 2.5% and 97.5% quantiles are 0 (P(k=0) = 0.35) and 0.3 (P(k<=2) = 0.930, P(k<=3) = 0.987)
    one = paired_difference({i: 0.0 for i in range(10)}, {i: float(i == 3) for i in range(10)})
    assert (one.mean, one.low, one.high) == pytest.approx((0.1, 0.0, 0.3))
    assert not one.beyond_noise and shifted.beyond_noise
    # instances one side did not score (NaN: excluded, None, missing) are not paired
    gaps = paired_difference({0: 0.2, 1: float("nan"), 2: 0.4, 3: 0.1}, {0: 0.3, 1: 0.9, 2: None})
    assert (gaps.mean, gaps.instances) == pytest.approx((0.1, 1))
    assert paired_difference({0: 0.2}, {1: 0.3}) is None
    # seeded: the same inputs give the same interval; another seed moves it a little
    rng = np.random.default_rng(5)
    a, b = dict(enumerate(rng.random(40))), dict(enumerate(rng.random(40)))
    assert paired_difference(a, b) == paired_difference(a, b)
    other = paired_difference(a, b, seed=1)
    assert other != paired_difference(a, b) and other.low == pytest.approx(paired_difference(a, b).low, abs=0.02)
    # the interval of a mean of 40 differences: about mean +- 1.96 standard errors
    diff = np.array([b[i] - a[i] for i in range(40)])
    se = diff.std() / np.sqrt(40)
    found = paired_difference(a, b)
    assert found.low == pytest.approx(diff.mean() - 1.96 * se, abs=0.25 * se)
    assert found.high == pytest.approx(diff.mean() + 1.96 * se, abs=0.25 * se)


def test_paired_rows_pair_by_instance_and_class() -> None:
    def rows(scores: list[tuple[int, int, str, float]]) -> list[dict]:
        return [{"image_id": i, "instance": k, "class": c, "dice": d} for i, k, c, d in scores]

    before = rows([(0, 0, "a", 0.5), (0, 1, "b", 0.2), (1, 0, "a", 0.7)])
    after = rows([(1, 0, "a", 0.9), (0, 0, "a", 0.6), (0, 1, "b", 0.1)])  # another order: paired by key
    found = paired_rows(before, after)
    assert found["overall"]["mean"] == pytest.approx((0.1 - 0.1 + 0.2) / 3)
    assert found["per_class"]["a"]["mean"] == pytest.approx(0.15) and found["per_class"]["a"]["instances"] == 2
    assert found["per_class"]["b"] == {"mean": pytest.approx(-0.1), "low": pytest.approx(-0.1),
                                       "high": pytest.approx(-0.1), "instances": 1}  # fmt: skip


# --- fit -----------------------------------------------------------------------------------------------------
def _fit(run_cli, root: Path, *extra: str) -> None:
    run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", root, "--trainer.num_sanity_val_steps", "0",
            *extra)  # fmt: skip


def test_fit_scores_the_untuned_model_before_the_first_step_and_a_resume_keeps_it(
    run_cli, shapes_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path("runs/quickstart/version_0")
    _fit(run_cli, shapes_root, "--trainer.max_epochs", "1")
    out = capsys.readouterr().out
    logged = [r for r in metrics_rows(run) if r.get("untuned_val_dice")]
    assert len(logged) == 1 and logged[0]["step"] == "0"  # before the first optimiser step
    untuned = float(logged[0]["untuned_val_dice"])
    assert {"untuned_val_iou", "untuned_val_dice/star", "untuned_val_dice/cross"} <= logged[0].keys()

    summary, best = SUMMARY.search(out), BEST.search(out)
    assert summary and best, out[-2000:]
    assert float(summary[1]) == pytest.approx(untuned, abs=1e-4)
    assert summary[3] == "0"
    # the best checkpoint is the better of the untuned model and the best epoch (here one epoch of a random model)
    assert float(best[1]) == pytest.approx(max(untuned, float(summary[2])), abs=1e-4)
    assert ("best-untuned-val_dice" in best[2]) == (float(summary[2]) <= untuned)
    assert float(summary[4]) == pytest.approx(float(summary[2]) - untuned, abs=2e-4)  # paired mean = difference
    assert float(summary[5]) <= float(summary[4]) <= float(summary[6])
    assert int(summary[7]) == _instances(shapes_root, "valid")
    written = json.loads((run / "untuned.json").read_text())
    assert written["untuned"] == pytest.approx(untuned) and written["best_epoch"] == 0
    assert set(written["difference"]["per_class"]) == {"star", "cross"}
    epoch0 = next(float(r["val_dice"]) for r in metrics_rows(run) if r.get("val_dice"))
    assert epoch0 != pytest.approx(untuned, abs=1e-3)  # trained weights score otherwise: a rescore would show

    # resumed: the untuned score of the first start, from the checkpoint; not measured again, not logged again
    _fit(run_cli, shapes_root, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    out = capsys.readouterr().out
    assert [float(r["untuned_val_dice"]) for r in metrics_rows(run) if r.get("untuned_val_dice")] == [untuned]
    assert float(SUMMARY.search(out)[1]) == pytest.approx(untuned, abs=1e-4)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    kept = next(v for k, v in state.items() if k.startswith("UntunedScore"))
    assert kept["untuned"]["metrics"]["untuned_val_dice"] == pytest.approx(untuned)
    assert json.loads((run / "untuned.json").read_text())["untuned"] == pytest.approx(untuned)


def test_no_epoch_beating_the_untuned_model_is_one_warning_and_the_pass_changes_no_training(
    run_cli, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # lr 1e-30 (0 is refused): each update is below half a float32 ulp of every weight, so training
    # changes nothing and no epoch can beat the untuned model
    common = ["--trainer.max_epochs", "1", "--model.init_args.lr", "1e-30", "--trainer.log_every_n_steps", "1"]
    _fit(run_cli, shapes_root, *common)
    captured = capsys.readouterr()
    summary = SUMMARY.search(captured.out)
    assert summary and summary[1] == summary[2], captured.out[-2000:]
    # the untuned score is a validation of the weights training started from (unchanged here)
    rows = metrics_rows(Path("runs/quickstart/version_0"))
    untuned = next(float(r["untuned_val_dice"]) for r in rows if r.get("untuned_val_dice"))
    assert untuned == pytest.approx(next(float(r["val_dice"]) for r in rows if r.get("val_dice")), abs=1e-7)
    assert (summary[4], summary[5], summary[6]) == ("+0.0000", "+0.0000", "+0.0000")
    warnings = [line for line in captured.err.splitlines() if "no epoch beat the untuned model" in line]
    assert len(warnings) == 1
    assert "lower model.init_args.lr" in warnings[0] and "validation split" in warnings[0]
    assert json.loads(Path("runs/quickstart/version_0/untuned.json").read_text())["improved"] is False

    # the same fit without the untuned pass draws the same prompt jitter: the same training losses
    callbacks = yaml.safe_load(DEFAULTS.read_text())["trainer"]["callbacks"]
    without = tmp_path / "without.yaml"
    without.write_text(
        yaml.safe_dump({"trainer": {"callbacks": [c for c in callbacks if "Untuned" not in c["class_path"]]}})
    )
    _fit(run_cli, shapes_root, *common, "--config", without)
    losses = [[r["train_loss"] for r in metrics_rows(Path(f"runs/quickstart/version_{i}")) if r.get("train_loss")]
              for i in (0, 1)]  # fmt: skip
    assert losses[0] and losses[0] == losses[1]
    assert not any(r.get("untuned_val_dice") for r in metrics_rows(Path("runs/quickstart/version_1")))


# --- test -----------------------------------------------------------------------------------------------------
def test_test_reports_the_untuned_model_beside_the_checkpoint(
    run_cli, shapes_root: Path, quickstart_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no test_report.png (the slowest part): an added TestReport replaces the default one
    report = ["--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.picture=false"]
    common = ["--config", QUICKSTART, "--data.init_args.root", shapes_root, *report]
    run_cli("test", *common, "--ckpt_path", quickstart_checkpoint)
    run_cli("test", *common, "--trainer.callbacks.untuned=true", "--ckpt_path", quickstart_checkpoint)
    printed = capsys.readouterr().out
    run_cli("test", *common)  # no checkpoint: the untrained model
    plain, both, untrained = (
        json.loads(Path(f"runs/quickstart/version_{i}/test_metrics.json").read_text()) for i in range(3)
    )
    assert "untuned" not in plain  # off by default
    assert not list(Path("runs/quickstart").glob("version_*/test_report.png"))  # the default report did nothing
    # the checkpoint's numbers are not disturbed; the untuned ones are the untrained model's
    assert both["overall"] == plain["overall"] and both["per_class"] == plain["per_class"]
    assert both["untuned"]["overall"] == pytest.approx(untrained["overall"])
    assert both["untuned"]["per_class"].keys() == untrained["per_class"].keys()
    for name, scores in untrained["per_class"].items():
        assert both["untuned"]["per_class"][name] == pytest.approx(scores), name
    difference = both["untuned"]["difference"]["dice"]
    assert difference["overall"]["instances"] == _instances(shapes_root, "test")
    assert difference["overall"]["mean"] == pytest.approx(both["overall"]["dice"] - untrained["overall"]["dice"])
    for name, paired in difference["per_class"].items():
        assert paired["mean"] == pytest.approx(both["per_class"][name]["dice"] - untrained["per_class"][name]["dice"])
        assert paired["low"] <= paired["mean"] <= paired["high"]
    # one report printed (the added TestReport replaces the default one), with the side-by-side table
    assert printed.count("Test report:") == 2 and "untuned vs checkpoint" in printed
    table = printed[printed.index("untuned vs checkpoint") :].splitlines()
    overall = difference["overall"]
    assert table[1].split()[:4] == ["all", str(overall["instances"]), f"{untrained['overall']['dice']:.4f}",
                                    f"{both['overall']['dice']:.4f}"]  # fmt: skip
    assert f"{overall['mean']:+.4f} [{overall['low']:+.4f}, {overall['high']:+.4f}]" in table[1]

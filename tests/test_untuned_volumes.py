"""The untuned model beside 3D results, and the untuned model as the best checkpoint until an epoch beats it.

Volumes: fit scores the validation volumes before the first step ((case, class) rows), once, kept on resume;
test reports the untuned model beside the checkpoint. Images and volumes alike: when no epoch beats the untuned
model, the best checkpoint (and ``ckpt_path`` best, the exported adapter) is the untuned model, with one warning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

import segtune.volume_scoring
from segtune.reports import compared_scores
from segtune.volume_scoring import VOLUME_SCORES
from tests.conftest import CONFIGS, metrics_rows
from tests.test_volumes import decathlon

VOLUMES = CONFIGS / "volumes_hippocampus.yaml"
QUICKSTART_LORA = CONFIGS / "quickstart_lora.yaml"
VOLUME_SUMMARY = re.compile(
    r"untuned val_dice ([0-9.]+) -> best ([0-9.]+) \(epoch (\d+)\): ([+-][0-9.]+) "
    r"\[95% CI ([+-][0-9.]+), ([+-][0-9.]+)\] over (\d+) validation \(case, class\) rows"
)
BEST = re.compile(r"Best checkpoint \(val_dice=([0-9.]+)\): (\S+)")
NO_EPOCH_BEAT = "no epoch beat the untuned model"


class WreckWeights(Callback):
    """Test helper: keeps the trainable weights the fit starts from in ``start_weights.pt`` (in the working
    folder), then zeroes every trainable weight after each training batch, so every epoch predicts nothing
    and scores below the untuned model."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainable = {k for k, p in pl_module.named_parameters() if p.requires_grad}
        start = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in trainable}
        torch.save(start, "start_weights.pt")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                if p.requires_grad:
                    p.zero_()


@pytest.fixture
def volumes(tmp_path: Path) -> Path:
    """Four small phantom cases in a Decathlon folder: two train, one validation, one test case."""
    return decathlon(tmp_path / "ds", cases=4)


def _volume_args(root: Path) -> list[object]:
    # the config's LiteMedSAM swapped for the tiny random SAM (DecoderOnly, its embedding cache in memory); no
    # per-slice ground-truth-box pass (half the scoring time): those scores are NaN, as any score may be
    return [
        "--config", VOLUMES, "--model.init_args.model", "sam-tiny", "--data.init_args.root", root,
        "--data.init_args.split_fractions", "[0.5, 0.25, 0.25]", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--data.init_args.persistent_workers", "false",
        "--model.init_args.volume_scoring.slice_scores", "false",
    ]  # fmt: skip


def test_volumes_fit_scores_the_untuned_model_once_and_a_resume_keeps_it(
    volumes: Path, run_cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scored: list[str] = []  # every case scored, by any path (the untuned pass, validation)
    score_case = segtune.volume_scoring.score_case

    def counting(module, item, *args, **kwargs):
        scored.append(item["volume"].case.name)
        return score_case(module, item, *args, **kwargs)

    monkeypatch.setattr(segtune.volume_scoring, "score_case", counting)
    # lr 1e-30 (0 is refused): the updates are below half a float32 ulp, so epoch 0 validates the very weights
    # the untuned pass scored: the same number shows that the pass scores volumes as validation does
    fit = [*_volume_args(volumes), "--model.init_args.lr", "1e-30", "--trainer.num_sanity_val_steps", "0",
           "--trainer.limit_train_batches", "1", "--trainer.log_every_n_steps", "1"]  # fmt: skip
    run_cli("fit", *fit, "--trainer.max_epochs", "1")
    out = capsys.readouterr().out
    run = Path("runs/volumes_hippocampus/version_0")
    assert len(scored) == 2  # the one validation case: before the first step, then epoch 0
    logged = [r for r in metrics_rows(run) if r.get("untuned_val_dice")]
    assert len(logged) == 1 and logged[0]["step"] == "0"
    untuned = float(logged[0]["untuned_val_dice"])
    # every volume score that depends on the model, per class too; the box floor is the same for any model
    expected = {f"untuned_val_{s}" for s in compared_scores(VOLUME_SCORES)} | {"untuned_val_dice/left"}
    assert expected <= {k for k, v in logged[0].items() if v}
    assert "untuned_val_box_dice" not in logged[0]
    epoch0 = next(float(r["val_dice"]) for r in metrics_rows(run) if r.get("val_dice"))
    assert untuned == pytest.approx(epoch0, abs=1e-7) and untuned > 0
    summary = VOLUME_SUMMARY.search(out)
    assert summary and float(summary[1]) == pytest.approx(untuned, abs=1e-4), out[-2000:]
    assert int(summary[7]) == 2  # one case, two classes: (case, class) rows
    written = json.loads((run / "untuned.json").read_text())
    assert written["unit"] == "case" and set(written["difference"]["per_class"]) == {"left", "right"}
    # no epoch beat it (the same score): the best checkpoint is the untuned model's
    assert written["best_checkpoint_is_untuned"] and "best-untuned-val_dice" in BEST.search(out)[2]

    # resumed: the first start's untuned score, from the checkpoint; no case scored again for it
    scored.clear()
    run_cli("fit", *fit, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    out = capsys.readouterr().out
    assert len(scored) == 1  # epoch 1's validation alone
    assert [float(r["untuned_val_dice"]) for r in metrics_rows(run) if r.get("untuned_val_dice")] == [untuned]
    assert float(VOLUME_SUMMARY.search(out)[1]) == pytest.approx(untuned, abs=1e-4)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    kept = next(v for k, v in state.items() if k.startswith("UntunedScore"))
    assert kept["untuned"]["unit"] == "case" and len(kept["untuned"]["rows"]) == 2


def test_volumes_test_reports_the_untuned_model_beside_the_checkpoint(
    volumes: Path, run_cli, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli("fit", *_volume_args(volumes), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "0")  # fmt: skip
    trained = Path("runs/volumes_hippocampus/version_0/checkpoints/last.ckpt")
    report = ["--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true"]
    capsys.readouterr()
    run_cli("test", *_volume_args(volumes), *report, "--ckpt_path", trained)
    printed = capsys.readouterr().out
    run_cli("test", *_volume_args(volumes))  # no checkpoint: the untrained model
    both, untrained = (
        json.loads(Path(f"runs/volumes_hippocampus/version_{i}/test_metrics.json").read_text()) for i in (1, 2)
    )
    assert both["unit"] == "case" and "untuned" in both
    # the untuned rows are the untrained model's, (case, class) by (case, class)
    assert both["untuned"]["overall"] == pytest.approx(untrained["overall"], nan_ok=True)
    assert both["untuned"]["per_instance"] == untrained["per_instance"]
    assert set(both["untuned"]["difference"]) == set(compared_scores(VOLUME_SCORES))
    dice = both["untuned"]["difference"]["dice"]
    assert dice["overall"]["instances"] == 2 and set(dice["per_class"]) == {"left", "right"}
    assert dice["overall"]["mean"] == pytest.approx(both["overall"]["dice"] - untrained["overall"]["dice"])
    table = printed[printed.index("untuned vs checkpoint") :].splitlines()
    assert table[0].split()[3] == "rows" and table[1].split()[:2] == ["all", "2"]


def test_when_training_makes_it_worse_the_best_checkpoint_is_the_untuned_model(
    run_cli, shapes_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--config", QUICKSTART_LORA, "--data.init_args.root", shapes_root]
    wreck = "--trainer.callbacks+=tests.test_untuned_volumes.WreckWeights"
    run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0", wreck)
    captured = capsys.readouterr()
    run = Path("runs/quickstart_lora/version_0")
    untuned = next(float(r["untuned_val_dice"]) for r in metrics_rows(run) if r.get("untuned_val_dice"))
    epochs = [float(r["val_dice"]) for r in metrics_rows(run) if r.get("val_dice")]
    assert len(epochs) == 1 and max(epochs) < untuned  # training made it worse
    best = BEST.search(captured.out)
    assert best and float(best[1]) == pytest.approx(untuned, abs=1e-4), captured.out[-2000:]
    path = Path(best[2])
    assert path.name == f"best-untuned-val_dice{untuned:.4f}.ckpt"
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == [path.name]  # the only best file
    # the untuned weights, exactly; the adapter exported as the best is that checkpoint's
    start = torch.load("start_weights.pt", weights_only=True)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in start)
    assert (run / "adapter" / "best_checkpoint.txt").read_text().splitlines()[0] == str(path)
    # one warning, saying which file the best checkpoint is
    warnings = [line for line in captured.err.splitlines() if NO_EPOCH_BEAT in line]
    assert len(warnings) == 1 and f"the best checkpoint is the untuned model ({path.name})" in warnings[0]
    written = json.loads((run / "untuned.json").read_text())
    assert not written["improved"] and written["best_checkpoint_is_untuned"] and written["best"] == max(epochs)

    # the best checkpoint validates to the untuned score, and tests as the untuned model beside it
    run_cli("validate", *common, "--ckpt_path", path)
    assert float(metrics_rows(Path("runs/quickstart_lora/version_1"))[-1]["val_dice"]) == pytest.approx(
        untuned, abs=1e-6
    )
    report = ["--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.untuned=true",
              "--trainer.callbacks.picture=false"]  # fmt: skip
    run_cli("test", *common, *report, "--ckpt_path", path)
    tested = json.loads(Path("runs/quickstart_lora/version_2/test_metrics.json").read_text())
    assert tested["overall"]["dice"] == pytest.approx(tested["untuned"]["overall"]["dice"], abs=1e-6)
    assert tested["untuned"]["difference"]["dice"]["overall"]["mean"] == pytest.approx(0, abs=1e-6)

"""Resume after kill -9, non-finite losses, atomic checkpoints, and bad input through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, metrics_rows, segtune_script

QUICKSTART = CONFIGS / "quickstart.yaml"
QUICKSTART_LORA = CONFIGS / "quickstart_lora.yaml"


def _last(rows: list[dict[str, str]], key: str) -> float:
    return [float(r[key]) for r in rows if r.get(key)][-1]


def test_kill_dash_nine_then_resume_matches_an_uninterrupted_run(shapes_root: Path, tmp_path: Path) -> None:
    fit = [
        segtune_script(), "fit", "--config", str(QUICKSTART), "--data.init_args.root", str(shapes_root),
        "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--data.init_args.batch_size", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks+=tests.junk_data.PauseInEpoch",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    done = subprocess.run(fit, cwd=whole, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    marker = tmp_path / "paused"
    proc = subprocess.Popen(fit, cwd=broken, env={**env, "SEGTUNE_TEST_PAUSE": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached the pause in epoch 1"
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 1: last.ckpt is the end of epoch 0
    proc.wait()
    run = broken / "runs/quickstart/version_0"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 0
    assert not list((run / "checkpoints").glob(".*.tmp"))

    resumed = subprocess.run([*fit, "--ckpt_path", "last"], cwd=broken, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (broken / "runs/quickstart/version_1").exists()  # continued in its own folder
    reference, after = metrics_rows(whole / "runs/quickstart/version_0"), metrics_rows(run)
    for key in ("val_dice", "val_iou", "val_box_dice", "train_loss"):
        assert _last(after, key) == pytest.approx(_last(reference, key), abs=1e-6), key
    assert {int(r["epoch"]) for r in after if r.get("val_dice")} == {0, 1, 2}  # earlier rows kept
    final = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    expected = torch.load(whole / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert final.keys() == expected.keys()
    assert all(torch.allclose(final[k], expected[k], atol=1e-6) for k in final)


def test_adapter_after_a_resume_is_still_the_best_checkpoints(run_cli, shapes_root: Path) -> None:
    from safetensors.torch import load_file

    common = ["--config", QUICKSTART_LORA, "--data.init_args.root", shapes_root, "--trainer.limit_train_batches", "2"]
    cwd = run_cli("fit", *common, "--trainer.max_epochs", "1")  # the best epoch: 0
    run = cwd / "runs/quickstart_lora/version_0"
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    # Resumed epochs validate nothing, so no later epoch can become the best: the adapter must stay epoch 0's.
    run_cli("fit", *common, "--trainer.max_epochs", "3", "--trainer.limit_val_batches", "0", "--ckpt_path", "last")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 2
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    best_weights = torch.load(best, weights_only=True)["state_dict"]
    last_weights = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]

    def ckpt_key(key: str) -> str:  # adapter file names -> the module's state_dict names
        return "model." + key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )

    assert lora and all(torch.equal(v, best_weights[ckpt_key(k)]) for k, v in lora.items())
    assert not all(torch.equal(v, last_weights[ckpt_key(k)]) for k, v in lora.items())  # training went on
    assert best.name in (run / "adapter" / "best_checkpoint.txt").read_text()


def test_resume_without_a_checkpoint_is_one_line(run_cli, shapes_root: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--ckpt_path", "last")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no version_*/checkpoints/last.ckpt to resume from" in err


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_naming_the_step_or_skips(policy: str, run_cli, shapes_root: Path, capsys) -> None:
    args = [
        "fit", "--config", QUICKSTART, "--data.class_path", "tests.junk_data.NaNBatchDataModule",
        "--data.init_args.root", shapes_root, "--data.init_args.nan_batch", "3", "--data.init_args.batch_size", "4",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--model.init_args.nonfinite_loss", policy,
    ]  # fmt: skip
    if policy == "skip":
        cwd = run_cli(*args)
        rows = metrics_rows(cwd / "runs/quickstart/version_0")
        assert {int(r["epoch"]) for r in rows if r.get("val_dice")} == {0, 1}
        return
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training loss is nan at step 3 (files: shapes_train_" in err and "last checkpoint is kept" in err
    # the run stopped in epoch 1; the checkpoint of epoch 0 is whole and loads
    last = Path.cwd() / "runs/quickstart/version_0/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0


def test_atomic_checkpoint_keeps_the_old_file_when_saving_fails(tmp_path: Path, monkeypatch) -> None:
    from segtune.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoints_load_weights_only(run_cli, shapes_root: Path, capsys) -> None:
    import datetime

    cwd = run_cli("fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--trainer.max_epochs", "1",
                  "--trainer.limit_train_batches", "1")  # fmt: skip
    last = cwd / "runs/quickstart/version_0/checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # what segtune writes loads safely
    checkpoint["planted"] = datetime.datetime(2026, 1, 1)  # any pickled object beyond tensors and plain values
    torch.save(checkpoint, cwd / "planted.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("test", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--ckpt_path", "planted.ckpt")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"segtune: error: {Path('planted.ckpt')}: holds pickled Python objects") and "datetime" in err

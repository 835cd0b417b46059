"""``segtune tune``: the search file and its one-line errors, a tiny study (a pruned trial, the report, best.yaml
refitted), a study shared by two processes, one of them killed with SIGKILL mid-trial, and DDP trials run as child
processes."""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from segtune.cli import main
from segtune.data.synthetic import write_shapes_coco
from segtune.tune.child import needs_own_process, trainer_settings
from segtune.tune.space import load_search
from tests.conftest import CONFIGS, ROOT

optuna = pytest.importorskip("optuna")

QUICKSTART = CONFIGS / "quickstart.yaml"
#: A learning rate that trains the tiny model, and one that wrecks it in its first step (val_dice 0.0 after the first
#: epoch, where the good one scores about 0.03-0.05: the median pruner must stop it there).
GOOD_LR, BAD_LR = 0.002, 1000.0


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training and two validation images: a trial of the tiny model costs about a second of CPU an epoch."""
    return write_shapes_coco(tmp_path_factory.mktemp("tune_shapes"), {"train": 2, "valid": 2, "test": 1}, seed=1)


#: The segtune lines of docs/tune.md's first bash block (comments cut off).
DOCS_LINES = [
    line.split("  #")[0].strip()
    for line in re.search(r"```bash\n(.*?)```", (ROOT / "docs/tune.md").read_text(), flags=re.S).group(1).splitlines()
    if line.startswith("segtune ")
]


def _docs_args(line: str, best: Path) -> list[str]:
    """A docs line's arguments: the shipped configs from the repository, the study's best.yaml for the example's."""
    args = shlex.split(line)[1:]
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    return [str(best) if a.endswith("/best.yaml") else a for a in args]


def test_docs_tune_lines_check_the_shipped_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/tune.md's segtune tune lines, as --dry-run with the tiny random model in place of LiteMedSAM (the real
    study is measured in the docs): the shipped config and search file parse, nothing is written."""
    tune = [line for line in DOCS_LINES if line.startswith("segtune tune")]
    assert len(tune) == 2
    for line in tune:
        args = _docs_args(line, tmp_path)
        args += [*([] if "--dry-run" in args else ["--dry-run"]), "--model.init_args.model", "sam-tiny"]
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--output", str(tmp_path)])
        assert exit_.value.code == 0
    assert "search_litemedsam_flakes.yaml parse (model.init_args.lr, trainer.max_epochs" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _val_dice(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["val_dice"]) for r in csv.DictReader(f) if r.get("val_dice")]


def test_search_file_reads_every_kind_and_conditional_blocks(tmp_path: Path) -> None:
    search = _write(
        tmp_path / "search.yaml",
        "model.init_args.lr: {log_uniform: [1.0e-5, 1.0e-3]}\n"
        "trainer.max_epochs: {int: [1, 4]}\n"
        "data.init_args.prompts.box_jitter: {uniform: [0.0, 0.1]}\n"
        "model.class_path:\n  choice:\n    segtune.methods.FullFinetune: {}\n"
        "    segtune.methods.LoRA:\n      model.init_args.r: {choice: [4, 8]}\n"
        "model.init_args.train_parts_like: {choice: [[a, b], [c]]}\n",
    )
    space = load_search(search)
    assert space.all_keys() == [
        "model.init_args.lr", "trainer.max_epochs", "data.init_args.prompts.box_jitter", "model.class_path",
        "model.init_args.train_parts_like", "model.init_args.r",
    ]  # fmt: skip
    assert len(space.combinations()) == 2  # one per class: r only with LoRA
    lora = space.suggest(optuna.trial.FixedTrial({
        "model.init_args.lr": 1e-4, "trainer.max_epochs": 2, "data.init_args.prompts.box_jitter": 0.05,
        "model.class_path": "segtune.methods.LoRA", "model.init_args.r": 8, "model.init_args.train_parts_like": '["c"]',
    }))  # fmt: skip
    assert lora["model.init_args.r"] == 8 and lora["model.init_args.train_parts_like"] == ["c"]  # lists as JSON
    full = space.suggest(optuna.trial.FixedTrial({
        "model.init_args.lr": 1e-4, "trainer.max_epochs": 2, "data.init_args.prompts.box_jitter": 0.05,
        "model.class_path": "segtune.methods.FullFinetune", "model.init_args.train_parts_like": '["a", "b"]',
    }))  # fmt: skip
    assert "model.init_args.r" not in full


BAD_SEARCH = {
    "unknown key": ("model.init_args.nope: {uniform: [0, 1]}", "model.init_args.nope: not a key"),
    "unknown trainer key": ("trainer.nope: {int: [1, 2]}", "trainer.nope: not a key segtune fit takes"),
    "empty choice": ("model.init_args.mask_loss: {choice: []}", "model.init_args.mask_loss: empty choice"),
    "inverted bounds": ("model.init_args.lr: {log_uniform: [1.0e-3, 1.0e-5]}", "model.init_args.lr: inverted bounds"),
    "log of zero": ("model.init_args.lr: {log_uniform: [0, 1]}", "model.init_args.lr: log_uniform needs low > 0"),
    "int of floats": ("trainer.max_epochs: {int: [1.5, 3]}", "trainer.max_epochs: int bounds must be whole"),
    "unknown distribution": ("model.init_args.lr: {normal: [0, 1]}", "model.init_args.lr: a distribution is one of"),
    "value refused": (
        "model.init_args.mask_loss: {choice: [focal, dice]}",
        "model.init_args.mask_loss: segtune fit refuses 'dice': Expected a typing.Literal",
    ),  # fmt: skip
    "type refused": ("trainer.max_epochs: {choice: [2, many]}", "trainer.max_epochs: segtune fit refuses 'many'"),
    "class key outside its block": (
        "model.init_args.r: {choice: [4, 8]}",
        "model.init_args.r: not a key segtune.methods.FullFinetune takes",
    ),  # fmt: skip
    "unknown class": ("model.class_path: {choice: [segtune.methods.Nope]}", "model.class_path: segtune fit refuses"),
    "callbacks": ("trainer.callbacks: {choice: [[]]}", "trainer.callbacks: not searchable"),
    "not a mapping": ("- model.init_args.lr", "a search file maps config keys to distributions"),
}


@pytest.mark.parametrize("case", BAD_SEARCH, ids=list(BAD_SEARCH))
def test_each_bad_search_file_stops_in_one_line_naming_the_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text, expected = BAD_SEARCH[case]
    search = _write(tmp_path / "search.yaml", text + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--config", str(QUICKSTART), "--search", str(search)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert f"{search}: {expected}" in err[0], err[0]
    assert not (tmp_path / "runs").exists()  # checked before anything is written


def test_without_optuna_one_line_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--config", str(QUICKSTART), "--search", str(tmp_path / "s.yaml")])
    assert "pip install segtune[tune]" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


def test_tiny_study_prunes_a_bad_trial_reports_and_best_yaml_refits_its_trial(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two trials: the good learning rate for one epoch, then the bad one for two, which the median pruner stops after
    its first validation (below the first trial's there). ``best.yaml`` refits the first trial's val_dice."""
    monkeypatch.chdir(tmp_path)
    space = "model.init_args.lr: {log_uniform: [1.0e-3, 1.0e+3]}\ntrainer.max_epochs: {int: [1, 2]}\n"
    search = _write(tmp_path / "search.yaml", space)
    (tmp_path / "runs/tiny").mkdir(parents=True)
    storage = f"sqlite:///{tmp_path / 'runs/tiny/study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    study.enqueue_trial({"model.init_args.lr": GOOD_LR, "trainer.max_epochs": 1})
    study.enqueue_trial({"model.init_args.lr": BAD_LR, "trainer.max_epochs": 2})
    args = ["tune", "--config", str(QUICKSTART), "--search", str(search), "--study", "tiny", "--trials", "2",
            "--pruner-startup-trials", "1", "--data.init_args.root", str(shapes), "--model.init_args.warmup_steps", "0",
            "--data.init_args.batch_size", "1"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs/tiny"
    lines = [ln for ln in out.splitlines() if ln.startswith("trial ")]
    assert [ln.split(":")[0] for ln in lines] == ["trial 0 complete", "trial 1 pruned"], out  # one line per trial
    assert "best " in lines[1] and "over untuned" in lines[0]
    pruned = folder / "trial_1/version_0"
    assert len(_val_dice(pruned)) == 1 and (pruned / "pruned.json").is_file()  # stopped after epoch 0 of 2
    assert (pruned / "checkpoints/last.ckpt").is_file()  # a pruned trial keeps its run
    report = yaml.safe_load((folder / "tune_report.json").read_text())
    assert [(r["trial"], r["state"]) for r in report] == [(0, "complete"), (1, "pruned")]
    assert report[0]["epochs"] == 1 and report[1]["epochs"] == 1
    first = report[0]
    assert first["val_dice"] == max(_val_dice(folder / "trial_0/version_0")) and first["gain_ci95"].startswith("[")
    assert first["untuned_val_dice"] == report[1]["untuned_val_dice"]  # scored once: the second trial read it
    assert "untuned_val_dice" not in (folder / "trial_1/version_0/metrics.csv").read_text()
    for name in ("tune_report.md", "tune_report.csv", "tune_history.png", "tune_importance.png", "tune_parallel.png"):
        assert (folder / name).stat().st_size > 0, name
    # best.yaml: the first trial's config as a config of its own, which a plain fit reproduces; then the test of
    # its checkpoint with the untuned model beside it (docs/tune.md's two lines, on this study's best.yaml)
    fit, test = (
        _docs_args(line, folder / "best.yaml")
        for line in DOCS_LINES
        if line.startswith(("segtune fit", "segtune test"))
    )
    main(fit)
    refit = tmp_path / "runs/tiny_best/version_0"
    assert _val_dice(refit) == _val_dice(folder / "trial_0/version_0")
    config = yaml.safe_load((refit / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == GOOD_LR
    assert "segtune.tune." not in str(config["trainer"]["callbacks"])  # the config's own callbacks, no pruning
    ckpt = str(next((refit / "checkpoints").glob("best-*.ckpt")))
    main([ckpt if a == "CKPT" else a for a in test])
    assert "untuned" in yaml.safe_load((tmp_path / "runs/tiny_best/version_1/test_metrics.json").read_text())
    # the same command again: the study has its trials, nothing is re-run
    with pytest.raises(SystemExit):
        main(args)
    assert "2 trials finished already" in capsys.readouterr().out


def _states(storage: str, name: str) -> dict[int, tuple[str, str | None]]:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # the database is still being made by a segtune tune process (tables, then the study)
        return {}
    return {t.number: (t.state.name, t.user_attrs.get("process")) for t in study.get_trials(deepcopy=False)}


@pytest.mark.slow
def test_two_processes_share_a_study_and_a_killed_one_loses_nothing(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ``segtune tune`` processes on one SQLite study; the first is killed (SIGKILL) in its second trial. The
    other, the same command, finishes the study; the command run once more (in this process: no third start-up)
    finds it done: no trial number twice, the killed trial FAIL once its heartbeat expired, every finished trial
    kept (not re-run)."""
    search = _write(tmp_path / "search.yaml", "model.init_args.lr: {log_uniform: [1.0e-3, 1.0e-2]}\n")
    command = [
        sys.executable, "-m", "segtune", "tune", "--config", str(QUICKSTART), "--search", str(search), "--study",
        "shared", "--trials", "3", "--heartbeat", "1", "--pruner", "none", "--data.init_args.root", str(shapes),
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'runs/shared/study.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1)  # the first creates the study; the second loads it
    second = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mine = f":{first.pid}"
    deadline = time.monotonic() + 120
    killed = None
    while time.monotonic() < deadline and first.poll() is None:
        states = _states(storage, "shared") if (tmp_path / "runs/shared/study.db").exists() else {}  # not made yet
        ran = [n for n, (s, p) in states.items() if p and p.endswith(mine)]
        running = [n for n in ran if states[n][0] == "RUNNING" and (tmp_path / f"runs/shared/trial_{n}").is_dir()]
        if any(states[n][0] == "COMPLETE" for n in ran) and running:  # in its second trial's fit
            killed = running[0]
            os.kill(first.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            break
        time.sleep(0.2)
    first.wait()
    assert killed is not None, "the first process never reached a second trial"
    out, _ = second.communicate(timeout=180)
    assert second.returncode == 0, out.decode()[-2000:]
    # The same command again. The killed trial is failed by the first start that finds its heartbeat expired (3 s):
    # the second process's next trial, or this one when the second had no trial left to start. Nothing runs again.
    monkeypatch.chdir(tmp_path)
    # a start within 3 heartbeats of the kill still takes the trial for alive; in this process there is no start-up
    # to wait through, so the second process can finish and this run start before that (it did once: RUNNING)
    time.sleep(max(0.0, killed_at + 3.5 - time.monotonic()))
    with pytest.raises(SystemExit) as rerun:
        main(command[3:])
    said = capsys.readouterr().out
    assert rerun.value.code == 0 and re.search(r"\d+ trials finished already", said), said[-2000:]
    assert not list(tmp_path.glob(f"runs/shared/trial_{len(_states(storage, 'shared'))}"))
    states = _states(storage, "shared")
    assert states[killed][0] == "FAIL"
    finished = [n for n, (s, _) in states.items() if s == "COMPLETE"]
    assert len(finished) >= 3 and sorted(states) == list(range(len(states)))  # numbers unique, none skipped
    # every finished trial has its own run, written once (a re-run would have refused the existing folder)
    for n in finished:
        assert len(_val_dice(tmp_path / f"runs/shared/trial_{n}/version_0")) == 1
    assert (tmp_path / f"runs/shared/trial_{killed}").is_dir()  # the killed trial's folder is kept
    # the first trial is the config as it is (its lr 0.002 lies in the searched range), queued once
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    assert [t.number for t in trials if t.user_attrs.get("baseline")] == [0]
    assert trials[0].params == {"model.init_args.lr": 0.002}
    assert not re.search(rf"^trial {killed} (complete|pruned)", out.decode(), re.M)  # the second never ran it


@pytest.mark.slow
def test_ddp_trials_run_as_child_processes_that_report_to_the_study_and_are_pruned(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trials on two CPU processes (``ddp`` over gloo) each run as ``python -m segtune fit``: the first completes with
    its val_dice in the study, which the child reported at each validation; the second (two epochs) is pruned after
    its first, both its processes stopping there. The pruning does not depend on the tiny model's scores: a trial
    another process finished with a first-epoch val_dice of 1.0 puts the median above any score of this one's."""
    # which trainers get a child, decided from the config alone
    assert needs_own_process({"accelerator": "cpu", "devices": "auto", "strategy": "auto", "num_nodes": 1}) is None
    assert needs_own_process({"devices": "0,", "strategy": "single_device"}) is None  # one device by its index
    assert needs_own_process({"devices": [0, 1]}) == "devices [0, 1]"
    assert needs_own_process({"devices": "2"}) == "devices 2"
    assert needs_own_process({"num_nodes": 2}) == "num_nodes 2"
    assert needs_own_process({"strategy": "deepspeed_stage_2", "devices": 1}) == "strategy deepspeed_stage_2"
    assert needs_own_process({"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy"}})
    assert needs_own_process(trainer_settings({"trainer": {"devices": 1}}, {"trainer.devices": 2})) == "devices 2"

    monkeypatch.chdir(tmp_path)
    search = _write(tmp_path / "search.yaml", "trainer.max_epochs: {int: [1, 2]}\n")
    (tmp_path / "runs/ddp").mkdir(parents=True)
    storage = f"sqlite:///{tmp_path / 'runs/ddp/study.db'}"
    study = optuna.create_study(study_name="ddp", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={0: 1.0}))  # trial 0
    study.enqueue_trial({"trainer.max_epochs": 1})
    study.enqueue_trial({"trainer.max_epochs": 2})
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--config", str(QUICKSTART), "--search", str(search), "--study", "ddp", "--trials", "3",
              "--pruner-startup-trials", "2", "--data.init_args.root", str(shapes), "--data.init_args.batch_size", "1",
              "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"])  # fmt: skip
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    folder = tmp_path / "runs/ddp"
    trials = optuna.load_study(study_name="ddp", storage=storage).get_trials(deepcopy=False)[1:]
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], out
    for t in trials:  # two processes ran each fit, and the child reported each validation to the study
        run = folder / f"trial_{t.number}/version_0"
        assert "MEMBER: 2/2" in (run.parent / "fit.log").read_text()
        assert list(t.intermediate_values.values()) == _val_dice(run)
    assert trials[0].value == _val_dice(folder / "trial_1/version_0")[0]  # the objective: the child's best epoch
    pruned = folder / "trial_2/version_0"
    assert len(_val_dice(pruned)) == 1 and (pruned / "pruned.json").is_file()  # stopped after epoch 0 of 2
    assert re.search(r"^trial 1 complete: max_epochs=1 -> val_dice .*\n^trial 2 pruned: max_epochs=2", out, re.M), out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_trials_own_process_ends_when_segtune_tune_is_killed(tmp_path: Path) -> None:
    """``kill -9`` of the tune process ends the fit it started (which called ``end_with_parent``) instead of
    leaving it training. Plain Python processes stand in for both, loading only ``child.py`` (no torch)."""
    load = (f"import importlib.util, os, sys, time; s = importlib.util.spec_from_file_location('c', "
            f"{str(ROOT / 'segtune' / 'tune' / 'child.py')!r}); c = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(c); ")  # fmt: skip
    fit = load + "c.end_with_parent(); print('ready', flush=True); time.sleep(60)"
    tune = load + (
        "import subprocess; os.environ[c.PARENT_VARIABLE] = str(os.getpid()); "
        f"p = subprocess.Popen([sys.executable, '-c', {fit!r}], stdout=subprocess.PIPE, text=True); "
        "p.stdout.readline(); print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", tune], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":  # ended, not yet reaped by init
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the trial's process kept running after its segtune tune was killed")

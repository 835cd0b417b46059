"""The README and the pages under docs/: set-up lines match CI and nox, every segtune line runs, the pages
stay short and their links lead somewhere."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from segtune.models.presets import PRESETS
from tests.conftest import ROOT
from tests.test_configs import TINY

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
#: Pages whose `segtune` lines this runner does not run, and why. Every other page under docs/ is run.
NOT_RUN = {
    # its one line tests a checkpoint without --data.init_args.root: the stand-in fit below then looks for the
    # config's own data/kvasir-seg and stops (tests/test_clicks.py scores clicks)
    "clicks.md": "segtune test with clicks, no data root",
    # `segtune tune` runs Optuna trials (tests/test_tune.py runs a study), and its last two lines need the
    # study's runs/tune_litemedsam_flakes/best.yaml: no stand-in here fits either
    "tune.md": "segtune tune and the best.yaml it writes",
}
# docs/volumes.md is read too but gives no line today: its commands are in ```text blocks
# (tests/test_volumes_cli.py runs the shipped volume config's fit, test and predict on small volumes)
#: Pages allowed over MAX_PAGE_LINES for now (to be split later).
LONG_PAGES = {"volumes.md"}  # 407 lines on 2026-12-09: the 3D page as it was written, not yet split
MAX_README_LINES, MAX_PAGE_LINES = 250, 300
PAGES = sorted(DOCS.glob("**/*.md"))
RUN_PAGES = [ROOT / "README.md", *(p for p in PAGES if p.name not in NOT_RUN)]
RUN_TEXT = "\n".join(p.read_text() for p in RUN_PAGES)
BASH_LINES = [
    line.split("  #")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", RUN_TEXT, flags=re.S)
    for line in block.splitlines()
    if line.strip() and not line.startswith("#")
]
# each once, also where the README and a page (or two pages) show the same line
SEGTUNE_LINES = list(dict.fromkeys(line for line in BASH_LINES if line.startswith("segtune ")))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    return {_slug(m.replace("`", "")) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_and_pages_stay_short() -> None:
    assert len(README.splitlines()) <= MAX_README_LINES
    long = {p.name: n for p in PAGES if (n := len(p.read_text().splitlines())) > MAX_PAGE_LINES}
    assert set(long) <= LONG_PAGES, long


def test_relative_links_lead_to_files_and_headings() -> None:
    broken = []
    for page in [ROOT / "README.md", *PAGES]:
        text = re.sub(r"^ *```.*?^ *```", "", page.read_text(), flags=re.S | re.M)  # not links inside code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [
        ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == ["python3 -m pip install nox && nox -s tests"]
    assert ci_lines[0] in BASH_LINES


def test_nox_sessions_named_in_readme_exist() -> None:
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    sessions = {
        f.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and any("session" in ast.unparse(d) for d in f.decorator_list)
    }
    named = {m for line in BASH_LINES for m in re.findall(r"nox -s (\w+)", line)}
    assert named and named <= sessions


@pytest.fixture(scope="module")
def checkpoint(quickstart_checkpoint: Path) -> Path:
    return quickstart_checkpoint


@pytest.mark.parametrize("line", SEGTUNE_LINES)
def test_segtune_command_runs(
    line: str, run_cli, checkpoint: Path, shapes_root: Path, masks_root: Path, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # configs/wandb.yaml: never ask for a W&B account here
    args = shlex.split(line)[1:]
    args = [str(checkpoint) if a in ("CKPT", "<best") else a for a in args]
    if args[0] == "compare":  # tests/test_compare.py runs a matrix; here: the line parses and lists
        with pytest.raises(SystemExit) as exit_info:
            args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
            run_cli(*args, "--output", "cmp", *([] if "--dry-run" in args else ["--dry-run"]))
        assert exit_info.value.code == 0
        return
    if args[0] == "convert":  # a small native checkpoint of that name, as the original code lays it out
        from tests.test_convert import write_native

        extra = write_native(args[args.index("--checkpoint") + 1], Path.cwd())
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*args, *extra)
        assert exit_info.value.code == 0
        assert (Path(args[args.index("--output") + 1]) / "preprocessor_config.json").is_file()
        return
    if args[0] in ("models", "export"):  # not Trainer runs: no data, their own exit codes
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*args)
        offline_download = "--download" in args
        assert exit_info.value.code == (1 if offline_download else 0)
        if args[0] == "export":
            out = Path(args[args.index("--output") + 1])
            written = "onnx_model.json" if "--onnx" in args else "config.json" if "--merge" in args else None
            assert (out / (written or "adapter_config.json")).is_file()
        return
    if "<best" in line:  # "<best checkpoint printed by fit>"
        args = args[: args.index(str(checkpoint)) + 1]
    args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
    args = [str(shapes_root) if a == "/path/to/export" else a for a in args]
    # the shared Kvasir subset: the small image/mask folder set here; a config's real checkpoint:
    # the tiny random model of its family (tests/test_litemedsam.py runs the real one)
    args = [str(masks_root) if a.startswith("../shared/data/kvasir") else a for a in args]
    config = next((Path(a) for a in args if a.endswith(".yaml")), None)
    if config is not None and "--model.init_args.model" not in args:
        preset = PRESETS.get(yaml.safe_load(config.read_text())["model"]["init_args"]["model"])
        if preset is not None and preset.config is None:
            args += ["--model.init_args.model", TINY[preset.model_class]]
            if str(checkpoint) in args:  # the quickstart's checkpoint does not fit this config: fit one
                run_cli("fit", *[a for a in args[1:] if a != str(checkpoint) and a != "--ckpt_path"],
                        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                        "--trainer.limit_val_batches", "1")  # fmt: skip
                own = str(next(Path("runs").glob("*/version_0/checkpoints/best-*.ckpt")))
                args = [own if a == str(checkpoint) else a for a in args]
    # the quickstart's data folder (data/shapes) is the small test set here
    args = [str(shapes_root / a.removeprefix("data/shapes/")) if a.startswith("data/shapes/") else a for a in args]
    if "points.json" in args:  # "Use your model": one positive point in the first test image
        first = sorted((shapes_root / "test").glob("*.jpg"))[0]
        Path("points.json").write_text(f'{{"{first.name}": [[160, 120, 1]]}}')
    if "ddp" in args:  # a multi-process launch cannot run inside pytest: tests/test_ddp.py runs it
        args.append("--print_config")
    if "--print_config" in args:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*args)
        assert exit_info.value.code == 0
        return
    if "--data.init_args.root" not in args:
        args += ["--data.init_args.root", str(shapes_root)]
    if args[0] == "fit":
        args += ["--trainer.fast_dev_run", "true"]
    args = ["sam-tiny" if a == "sam-vit-base" else a for a in args]  # no hub download here
    run_cli(*args)


def test_own_data_config_snippet_runs(run_cli, shapes_root: Path, tmp_path: Path) -> None:
    snippet = re.search(r"```yaml\n(# configs/my_data.yaml\n.*?)```", RUN_TEXT, flags=re.S).group(1)
    assert "/path/to/my-dataset" in snippet and "model: sam-vit-base" in snippet
    config = tmp_path / "my_data.yaml"
    config.write_text(
        snippet.replace("/path/to/my-dataset", str(shapes_root)).replace("model: sam-vit-base", "model: sam-tiny")
    )
    run_cli("fit", "--config", config, "--trainer.fast_dev_run", "true")


def test_yaml_fragments_parse_on_the_quickstart(run_cli, tmp_path: Path) -> None:
    import textwrap

    blocks = [textwrap.dedent(m[1]) for m in re.findall(r"^( *)```yaml\n(.*?)^\1```", RUN_TEXT, flags=re.S | re.M)]
    fragments = [b for b in blocks if not b.startswith("# configs/")]
    assert fragments  # the data section's augmentation example at least
    for i, fragment in enumerate(fragments):
        path = tmp_path / f"fragment{i}.yaml"
        path.write_text(fragment)
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", "--config", ROOT / "configs/quickstart.yaml", "--config", path, "--print_config")
        assert exit_info.value.code == 0

"""Every volume option is checked when it is made, before any work, in one line naming its config key
(issue 35, point 5: a negative NSD tolerance used to stop only after a case had been scored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segtune.data.slices import VolumeOptions
from segtune.propagation import PropagationOptions, StopRule
from segtune.volume_scoring import VolumeScoring

NAN, INF = float("nan"), float("inf")
SCORING = "model.init_args.volume_scoring"
VOLUMES = "data.init_args.volumes"

# (class, option, bad value, what the line says after "<key> must be ")
BAD = [
    (VolumeScoring, "prompt", "box4d", "one of ['box3d', 'box2d']"),
    (VolumeScoring, "propagation", "video", "one of ['box', 'memory']"),
    (VolumeScoring, "tolerance_mm", -1.0, "> 0 (got -1.0)"),
    (VolumeScoring, "tolerance_mm", 0, "> 0 (got 0)"),
    (VolumeScoring, "tolerance_mm", NAN, "> 0 (got nan)"),
    (VolumeScoring, "tolerance_mm", INF, "finite (got inf)"),
    (VolumeScoring, "box_margin", -0.5, ">= 0 (got -0.5)"),
    (VolumeScoring, "box_margin", INF, "finite (got inf)"),
    (VolumeScoring, "stop", (0.5, 0.5), "a StopRule"),
    (VolumeScoring, "choose_stop", "yes", "true or false (got 'yes')"),
    (VolumeScoring, "mask_prompt", 1, "true or false (got 1)"),
    (VolumeScoring, "largest_component", None, "true or false (got None)"),
    (VolumeScoring, "slice_scores", 0, "true or false (got 0)"),
    (VolumeScoring, "min_pixels", -1, "an integer >= 0 (got -1)"),
    (VolumeScoring, "slice_batch", 0, "an integer >= 1 (got 0)"),
    (VolumeScoring, "slice_batch", 2.5, "an integer >= 1 (got 2.5)"),
    (VolumeScoring, "slice_cache_mib", -1, "an integer >= 0 (got -1)"),
    (StopRule, "min_score", -0.1, "in [0, 1] (got -0.1)"),
    (StopRule, "min_score", NAN, "in [0, 1] (got nan)"),
    (StopRule, "min_overlap", 1.5, "in [0, 1] (got 1.5)"),
    (VolumeOptions, "axis", "w", "one of ['auto', 'z', 'y', 'x']"),
    (VolumeOptions, "instances", "lesions", "one of ['semantic', 'components']"),
    (VolumeOptions, "min_area", -1, "an integer >= 0 (got -1)"),
    (VolumeOptions, "empty_slices", -0.1, "a fraction in [0, 1] (got -0.1)"),
    (VolumeOptions, "propagation_prompts", 1.5, "a fraction in [0, 1] (got 1.5)"),
    (VolumeOptions, "propagation_prompts", NAN, "a fraction in [0, 1] (got nan)"),
    (VolumeOptions, "propagation_offset", 0, "1 or more (slices) (got 0)"),
    (PropagationOptions, "margin", -1.0, "a finite number >= 0 (pixels) (got -1.0)"),
    (PropagationOptions, "min_pixels", -1, "an integer >= 0 (got -1)"),
    (PropagationOptions, "mask_prompt", "no", "true or false (got 'no')"),
]
# PropagationOptions is built from volume_scoring's checked values: only code that builds one meets its checks
KEY = {VolumeScoring: SCORING, StopRule: f"{SCORING}.stop", VolumeOptions: VOLUMES}
KEY[PropagationOptions] = "PropagationOptions"


@pytest.mark.parametrize(("cls", "option", "value", "says"), BAD, ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_bad_volume_option_stops_in_one_line_naming_its_key(cls: type, option: str, value, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        cls(**{option: value})
    message = str(raised.value)
    assert message.startswith(f"{KEY[cls]}.{option} must be {says}"), message
    assert "\n" not in message


def test_the_defaults_and_every_edge_of_a_range_are_accepted() -> None:
    VolumeScoring()
    VolumeScoring(tolerance_mm=1e-3, box_margin=0, min_pixels=0, slice_batch=1, slice_cache_mib=0, prompt="box2d")
    VolumeScoring(stop=StopRule(1.0, 0.0), propagation="memory")
    VolumeOptions(min_area=0, empty_slices=1.0, propagation_prompts=0, propagation_offset=1, axis="x")
    PropagationOptions(margin=0.0, min_pixels=0)


def test_a_bad_tolerance_on_the_command_line_stops_before_any_work(run_cli, tmp_path: Path, capsys) -> None:
    config = Path(__file__).parents[1] / "configs" / "volumes_hippocampus.yaml"
    with pytest.raises(SystemExit) as exit_info:
        # an empty data folder and a random model: neither is read before the options are made
        run_cli("test", "--config", config, "--data.init_args.root", tmp_path, "--model.init_args.model", "sam-tiny",
                f"--{SCORING}.tolerance_mm", "-1")  # fmt: skip
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"segtune: error: {SCORING}.tolerance_mm must be > 0 (got -1.0) "), err[-3:]
    assert not (tmp_path / "runs").exists()

"""The prompts json of ``segtune predict`` on volumes: every bad entry stops with one line before any model work."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segtune.data.slices import VolumeOptions
from segtune.data.volume_prompts import prompts_by_case, read_volume_prompts
from segtune.data.volumes import Geometry, predict_cases, write_volume
from tests.test_volume_protocols_cli import TINY
from tests.test_volumes import decathlon

#: The tiny scans' ``(z, y, x)`` shape: 6 slices across z of 48 columns (x) by 40 rows (y).
SHAPE = (6, 40, 48)
CLASSES = [1, 2]
BOX = [8, 6, 40, 30]


def scans(folder: Path, names: tuple[str, ...] = ("scan_7.nii.gz",)) -> Path:
    """A folder of empty scans of :data:`SHAPE`, z the thickest axis (so ``axis: auto`` slices across z)."""
    for name in names:
        if name.endswith(".npz"):
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / name, imgs=np.zeros(SHAPE, np.uint8), spacing=np.array([0.8, 0.8, 3.0]))
        else:
            write_volume(np.zeros(SHAPE, np.uint8), Geometry((0.8, 0.8, 3.0)), folder / name)
    return folder


def joined(tmp_path: Path, data: Any, axis: str = "auto", folder: Path | None = None) -> dict[str, list[dict]]:
    """``data`` written as a prompts json, read and joined to the scans as ``segtune predict`` does."""
    folder = folder or scans(tmp_path / "scans")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    prompts = read_volume_prompts(path, CLASSES)
    return prompts_by_case(predict_cases(folder), prompts, path, folder, VolumeOptions(axis=axis).slice_axis)


def entry(**given: Any) -> dict[str, Any]:
    """A valid box entry on slice 3 with ``given`` keys replaced (a None value drops the key)."""
    out = {"slice": 3, "box": BOX, "label": 1, **given}
    return {k: v for k, v in out.items() if v is not None}


NAN, INF = float("nan"), float("inf")
OUTSIDE = '"box" lies outside the 48x40 slice: x is in [0, 48] (along the volume\'s x), y in [0, 40] (along its y)'
CLASS = "is not a class: the label must be one of the class values 1, 2"
BAD_ENTRIES = {
    # kind: (the entry, what the message says after "<json>: entry 'scan_7': <entry> ")
    "box outside the slice": (entry(box=[8, 6, 60, 30]), OUTSIDE),
    "box below the slice": (entry(box=[8, 6, 40, 41]), '"box" lies outside the 48x40 slice'),
    "negative coordinate": (entry(box=[-2, 6, 40, 30]), '"box" has a negative coordinate'),
    "inverted box (x)": (entry(box=[40, 6, 8, 30]), '"box" has x1 <= x0: a box is [x0, y0, x1, y1] with x1 > x0'),
    "zero-height box": (entry(box=[8, 6, 40, 6]), '"box" has y1 <= y0'),
    "NaN coordinate": (entry(box=[8, NAN, 40, 30]), '"box" has a coordinate that is not a finite number'),
    "infinite coordinate": (entry(box=[8, 6, INF, 30]), '"box" has a coordinate that is not a finite number'),
    "box of 3 numbers": (entry(box=[8, 6, 40]), '"box" is not [x0, y0, x1, y1], four numbers'),
    "label that is no class": (entry(label=7), f'"label" 7 {CLASS}'),
    "string label": (entry(label="a"), f"\"label\" 'a' {CLASS}"),
    "fractional slice": (entry(slice=3.7), '"slice" 3.7 is not a whole number >= 0'),
    "string slice": (entry(slice="3"), "\"slice\" '3' is not a whole number >= 0"),
    "negative slice": (entry(slice=-1), '"slice" -1 is not a whole number >= 0'),
    "slice past the volume": (entry(slice=6), '"slice" 6 lies outside the volume: it has 6 slices across z (0 to 5;'),
    "no slice": (entry(slice=None), 'has no "slice"'),
    "fractional slices": (entry(slices=[2.5, 4]), '"slices" is not [first, last], two whole numbers'),
    "slices without the slice": (entry(slices=[4, 5]), '"slices" [4, 5] does not hold "slice" 3'),
    "slices past the volume": (entry(slices=[2, 9]), '"slices" [2, 9] reaches outside the volume: it has 6 slices'),
    "point label 2": (entry(box=None, points=[[10, 12, 2]]), "points (label 1 or 0): [10, 12, 2] has label 2"),
    "point not a triple": (entry(box=None, points=[[10, 12]]), '"points" is not a list of [x, y, label] points'),
    "NaN point": (entry(box=None, points=[[NAN, 12, 1]]), "has a coordinate that is not a finite number"),
    "point outside the slice": (entry(box=None, points=[[10, 45, 1]]), "point [10, 45] lies outside the 48x40 slice"),
    "point beside a box outside the slice": (entry(points=[[10, 45, 1]]), "point [10, 45] lies outside the 48x40"),
    "neither box nor points": (entry(box=None), 'has neither "box" nor "points"'),
    "misspelt key": (entry(slice_range=[2, 4]), "has the key 'slice_range'; an entry holds 'slice', 'box'"),
    "not an object": ([3, 8, 6, 40, 30], 'is not {"slice": k, "box": [x0, y0, x1, y1], "label": v}'),
}  # fmt: skip


@pytest.mark.parametrize("kind", BAD_ENTRIES)
def test_a_bad_entry_stops_with_one_line_naming_the_file_the_entry_and_the_rule(kind: str, tmp_path: Path) -> None:
    bad, rule = BAD_ENTRIES[kind]
    with pytest.raises(ValueError) as error:
        joined(tmp_path, {"scan_7": [entry(), bad]})
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'prompts.json'}: entry 'scan_7': {bad!r} "), message
    assert rule in message and "\n" not in message


def test_coordinates_are_checked_in_the_slice_the_prompt_is_on(tmp_path: Path) -> None:
    """Across x a slice has 6 rows (z) of 40 columns (y), and there are 48 slices: a box fits the slice the
    model sees, whatever the axis."""
    assert joined(tmp_path, {"scan_7": [entry(slice=30, box=[2, 1, 38, 6])]}, axis="x")["scan_7"][0]["slice"] == 30
    with pytest.raises(
        ValueError,
        match=r"lies outside the 40x6 slice: x is in \[0, 40\] \(along the volume's y\), y in \[0, 6\] \(along its z\)",
    ):
        joined(tmp_path, {"scan_7": [entry(slice=30, box=[2, 1, 38, 7])]}, axis="x")
    npz = scans(tmp_path / "npz", ("scan_7.npz",))  # MedSAM2's npz: its size from the array's header too
    with pytest.raises(ValueError, match=r"\"slice\" 6 lies outside the volume: it has 6 slices across z"):
        joined(tmp_path, {"scan_7": [entry(slice=6)]}, folder=npz)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, ": no entry; a volume prompts json maps case names to lists of"),
        ({"scan_8": [entry()], "scan_9.nii.gz": [entry()]}, ": none of its 2 entries names a volume in "),
        ({"scan_7": [entry()], "SCAN_7.nii.gz": [entry()]}, ": entries 'scan_7' and 'SCAN_7.nii.gz' name the same"),
    ],
    ids=["empty json", "no key names a volume", "two keys of one case"],
)  # fmt: skip
def test_a_json_that_prompts_no_volume_or_one_twice_stops(data: dict, says: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        joined(tmp_path, data)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'prompts.json'}{says}") and "\n" not in message
    if "none of its" in says:
        assert "(e.g. 'scan_8'; the folder has scan_7.nii.gz): keys are case names or volume file names" in message


def test_keys_naming_no_volume_beside_others_are_listed_in_one_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="segtune"):
        got = joined(tmp_path, {"scan_7": [entry()], "scan_8": [entry()], "other.nii.gz": []})
    assert list(got) == ["scan_7"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 entries name no volume in " in warning and warning.endswith("are ignored: 'scan_8', 'other.nii.gz'")


def test_a_valid_json_reads_as_before(tmp_path: Path) -> None:
    """Box, points, both together and slice ranges, keyed by file name or case name, integral floats as numpy
    writes them: what predict reads is what it read before the checks."""
    folder = scans(tmp_path / "scans", ("scan_7.nii.gz", "Scan_9.nrrd"))
    data = {
        "scan_7.nii.gz": [
            {"slice": 3, "box": [8, 6, 48, 40], "label": 2},  # the far corner on the slice's edge
            {"slice": 2.0, "points": [[10, 12, 1], [30.5, 20, 0]], "slices": [0, 5]},
            {"slice": 4, "box": [8, 6, 40, 30], "points": [[20, 12, 1], [9, 7, 0]]},  # a box with its points
        ],
        "scan_9": {"slice": 5, "box": [0, 0, 1.5, 2], "slices": [5, 5], "label": 1.0},  # one object, no list
    }
    assert joined(tmp_path, data, folder=folder) == {
        "scan_7": [
            {"slice": 3, "box": [8.0, 6.0, 48.0, 40.0], "points": None, "label": 2, "slices": None},
            {"slice": 2, "box": None, "points": [[10.0, 12.0, 1.0], [30.5, 20.0, 0.0]], "label": 1, "slices": [0, 5]},
            {"slice": 4, "box": [8.0, 6.0, 40.0, 30.0], "points": [[20.0, 12.0, 1.0], [9.0, 7.0, 0.0]], "label": 1,
             "slices": None},
        ],
        "scan_9": [{"slice": 5, "box": [0.0, 0.0, 1.5, 2.0], "points": None, "label": 1, "slices": [5, 5]}],
    }  # fmt: skip


def test_predict_with_a_bad_prompts_json_stops_with_one_line_and_writes_nothing(
    tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = scans(tmp_path / "scans")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"scan_7": [entry(), entry(box=[8, NAN, 40, 30])]}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("predict", *TINY, "--data.init_args.root", decathlon(tmp_path / "ds", cases=1),
                "--data.init_args.predict_images", folder, "--data.init_args.predict_prompts", path)  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("segtune: error:")]
    assert line.startswith(f"segtune: error: {path}: entry 'scan_7': ") and "not a finite number" in line
    # before any model work: nothing written (Lightning's logger makes an empty version folder before data setup)
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]

"""3D volumes: reading with their geometry, per-volume intensities, training slices, bad volumes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from segtune.data.datamodule import SegmentationDataModule
from segtune.data.intensity import IntensityPolicy, volume_to_model_range
from segtune.data.slices import VolumeOptions
from segtune.data.volumes import Geometry, VolumeCase, read_volume, write_volume
from segtune.models.loading import preprocessing_for
from segtune.volume_output import write_prediction
from segtune.volume_scoring import VolumeScoring, predict_volumes

#: z (slices) 4 mm, y 0.7 mm, x 0.5 mm; an oblique direction and an origin far from 0, so a mix-up shows.
SPACING = (0.5, 0.7, 4.0)
ORIGIN = (-120.5, 33.25, 801.0)
ANGLE = np.deg2rad(20)
DIRECTION = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, -1.0)


def phantom(shape: tuple[int, int, int] = (12, 40, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float MRI-like image and a label volume with two ellipsoids (labels 1 and 2), ``(z, y, x)``."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    label[((z - 5) / 4) ** 2 + ((y - 14) / 8) ** 2 + ((x - 14) / 9) ** 2 <= 1] = 1
    label[((z - 7) / 3) ** 2 + ((y - 26) / 6) ** 2 + ((x - 33) / 7) ** 2 <= 1] = 2
    rng = np.random.default_rng(seed)
    image = (rng.normal(300, 40, shape) + 900 * (label > 0)).astype(np.float32)
    return image, label


def write_case(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def decathlon(root: Path, cases: int = 4, suffix: str = ".nii.gz", channel: str = "") -> Path:
    """A Decathlon / nnU-Net folder of ``cases`` phantoms with a dataset.json (nnU-Net v2 label form)."""
    for i in range(cases):
        image, label = phantom(seed=i)
        write_case(root / "imagesTr" / f"case_{i:03d}{channel}{suffix}", image)
        write_case(root / "labelsTr" / f"case_{i:03d}{suffix}", label)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}))
    return root


def datamodule(root: Path, **kwargs) -> SegmentationDataModule:
    kwargs.setdefault("intensity", IntensityPolicy("percentile"))
    kwargs.setdefault("split_fractions", (0.5, 0.25, 0.25))
    kwargs.setdefault("cache_images", 64)
    return SegmentationDataModule(root, preprocessing=preprocessing_for("sam-tiny"), **kwargs)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_geometry_survives_read_and_write(suffix: str, tmp_path: Path) -> None:
    image, label = phantom()
    image_path, label_path = (
        write_case(tmp_path / f"image{suffix}", image),
        write_case(tmp_path / f"label{suffix}", label),
    )
    case = VolumeCase("c", image_path, label_path)
    volume = read_volume(case, [1, 2])
    assert volume.geometry.spacing == pytest.approx(SPACING) and volume.geometry.origin == pytest.approx(ORIGIN)
    assert np.array_equal(volume.label, label)
    out = write_volume(volume.label, volume.geometry, tmp_path / "out" / f"pred{suffix}")
    back, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(case.image))
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, get)() == pytest.approx(getattr(source, get)(), abs=1e-6), get
    assert np.array_equal(sitk.GetArrayFromImage(back), label)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary file was renamed, none left


def test_npz_spacing_is_x_y_z_and_slices_cut_across_the_largest(tmp_path: Path) -> None:
    image, label = phantom()
    # MedSAM2's npz: imgs (D, H, W) uint8 already windowed, spacing (x, y, z): the reverse of the array axes
    np.savez(tmp_path / "ct_001.npz", imgs=(image / image.max() * 255).astype(np.uint8), gts=label,
             spacing=np.array(SPACING), origin=np.array(ORIGIN), direction=np.array(DIRECTION))  # fmt: skip
    volume = read_volume(VolumeCase("ct_001", tmp_path / "ct_001.npz", tmp_path / "ct_001.npz"))
    assert volume.geometry.array_spacing == pytest.approx((4.0, 0.7, 0.5))
    assert VolumeOptions().slice_axis(volume.geometry) == 0
    # an axis with the largest spacing elsewhere is the one slices cut across
    assert VolumeOptions().slice_axis(Geometry((3.0, 1.0, 1.0))) == 2
    assert volume_to_model_range(volume.image, IntensityPolicy()) is volume.image  # uint8 passes through


def test_intensity_is_one_scale_per_volume() -> None:
    volume = np.stack([np.full((4, 4), 100.0), np.full((4, 4), 200.0), np.linspace(0, 1000, 16).reshape(4, 4)])
    scaled = volume_to_model_range(volume.astype(np.float32), IntensityPolicy("minmax"))
    assert scaled[0].max() == pytest.approx(0.1) and scaled[1].max() == pytest.approx(0.2)  # not each slice 0..1
    hounsfield = np.array([[[-1000.0, 40.0, 240.0, 900.0]]])
    ct = volume_to_model_range(hounsfield, IntensityPolicy("window", window="soft_tissue"))
    assert ct.ravel() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="not one of soft_tissue"):
        IntensityPolicy("window", window="liverish")


def test_decathlon_folder_trains_by_slices(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds", channel="_0000")  # nnU-Net v2 names: case_000_0000.nii.gz
    dm = datamodule(root, volumes=VolumeOptions(empty_slices=0.5))
    assert dm.layout == "volumes" and dm.class_names == ["left", "right"]
    dm.setup("fit")
    train = dm.datasets["fit"]
    label = phantom()[1]
    foreground = int((label.reshape(len(label), -1) > 0).any(1).sum())
    empty = len(label) - foreground
    assert len(train) == 2 * (foreground + round(0.5 * empty))  # two training cases
    store = train.records[0].store
    samples = [train[i] for i in range(len(train))]
    assert store.reads == 2  # each volume read and normalised once for all its slices
    keys = {(s["image_path"], s["image_key"]) for s in samples}
    assert len(keys) == len(samples)  # the embedding cache key tells the slices apart
    by_key = {s["image_key"]: s for s in samples if s["image_path"].endswith("case_000_0000.nii.gz")}
    k = int(np.argmax((label == 2).sum(axis=(1, 2))))
    sample = by_key[f"z={k}"]
    assert sorted(sample["category_ids"].tolist()) == [0, 1] and sample["original_size"] == (40, 48)
    assert all(
        np.array_equal(m.numpy(), label[k] == c + 1)
        for m, c in zip(sample["masks"], sample["category_ids"], strict=True)
    )
    blank = [s for s in samples if not s["masks"].any()]
    assert len(blank) == 2 * round(0.5 * empty) and all(len(s["input_boxes"]) for s in blank)  # prompted, empty target
    dm.setup("test")
    item = dm.datasets["test"][0]
    assert item["volume"].spacing == pytest.approx((4.0, 0.7, 0.5)) and item["volume"].label.shape == label.shape


def test_components_rule_gives_one_prompt_per_component(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds", cases=4)
    dm = datamodule(root, volumes=VolumeOptions(instances="components"))
    dm.setup("fit")
    record = dm.datasets["fit"].records[0]
    store = record.store.get(record.case)
    two = store.label.copy()
    two[:, :, 24:] = 0  # only label 1; then cut it in two
    two[:, 14, :] = 0
    from segtune.data.slices import slice_instances

    masks, classes = slice_instances(two[5], [1, 2], VolumeOptions(instances="components"))
    assert classes == [0, 0] and sum(int(m.sum()) for m in masks) == int((two[5] == 1).sum())


def _bad(root: Path, what: str) -> Path:
    image, label = phantom()
    if what == "shape":
        write_case(root / "labelsTr" / "case_000.nii.gz", label[:, :, :-3])
        return root / "labelsTr" / "case_000.nii.gz"
    if what == "geometry":
        write_case(root / "labelsTr" / "case_000.nii.gz", label, spacing=(0.5, 0.7, 5.0))
        return root / "labelsTr" / "case_000.nii.gz"
    if what == "values":
        write_case(root / "labelsTr" / "case_000.nii.gz", np.where(label == 2, 7, label).astype(np.uint8))
        return root / "labelsTr" / "case_000.nii.gz"
    if what == "4d":
        four = sitk.JoinSeries([sitk.GetImageFromArray(image)] * 2)
        sitk.WriteImage(four, str(root / "imagesTr" / "case_000.nii.gz"))
        return root / "imagesTr" / "case_000.nii.gz"
    (root / "imagesTr" / "case_000.nii.gz").write_bytes(b"not a volume at all")
    return root / "imagesTr" / "case_000.nii.gz"


@pytest.mark.parametrize(
    ("what", "says"),
    [
        ("shape", "label volume is 45x40x12 (x, y, z) but its image is 48x40x12"),
        ("geometry", "the label's geometry differs from its image case_000.nii.gz (spacing"),
        ("values", "label values [7] are not among the classes [1, 2]"),
        ("4d", "a 4D image; segtune reads 3D volumes"),
        ("unreadable", "cannot read volume"),
    ],
)
def test_a_bad_volume_stops_in_one_line_naming_the_file(what: str, says: str, tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    bad = _bad(root, what)
    dm = datamodule(root, split_fractions=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert message.startswith(f"{bad}: ") and says in message and "\n" not in message


def test_image_and_label_folders_and_npz_are_recognised(tmp_path: Path) -> None:
    image, label = phantom()
    for split in ("train", "valid"):
        write_case(tmp_path / "mha" / split / "images" / f"a_{split}.mha", image)
        write_case(tmp_path / "mha" / split / "labels" / f"a_{split}.mha", label)
    dm = datamodule(tmp_path / "mha", categories=["one", "two"])
    assert dm.layout == "volumes" and dm.volume_source.layout.kind == "folders"
    assert [c.name for c in dm.volume_source.cases("validate")] == ["a_valid"]
    (tmp_path / "npz").mkdir()
    for i in range(3):
        np.savez(tmp_path / "npz" / f"ct_{i}.npz", imgs=image.astype(np.uint8), gts=label, spacing=np.array(SPACING))
    dm = datamodule(tmp_path / "npz", split_fractions=(0.34, 0.33, 0.33))
    assert dm.layout == "volumes" and dm.class_names == ["1", "2"]  # named by value without dataset.json
    assert len(dm.volume_source.cases("fit")) == 1


class BoxModel(torch.nn.Module):
    """A module stand-in: predicts the low-resolution mask cells that lie inside its box prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.preprocessing = preprocessing_for("sam-tiny")
        self.volume_scoring = VolumeScoring()
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, batch: dict) -> SimpleNamespace:
        pre, boxes = self.preprocessing, batch["input_boxes"]
        factor = pre.mask_size / pre.image_size
        grid = torch.arange(pre.mask_size) + 0.5
        x0, y0, x1, y1 = ((boxes[..., i] * factor)[..., None, None] for i in range(4))
        inside = (grid[None, None, None, :] >= x0 + 0.5) & (grid[None, None, None, :] <= x1 - 0.5)
        inside = inside & (grid[None, None, :, None] >= y0 + 0.5) & (grid[None, None, :, None] <= y1 - 0.5)
        logits = torch.where(inside, 10.0, -10.0)[:, :, None]
        return SimpleNamespace(pred_masks=logits, iou_scores=torch.ones(*boxes.shape[:2], 1))


def test_predicted_nrrd_keeps_the_source_geometry(tmp_path: Path) -> None:
    """read, predict (slices through the batch path, propagated), write, read back: the same grid."""
    image, label = phantom(shape=(6, 40, 48))
    scans = tmp_path / "scans"
    source = write_case(scans / "scan_7.nrrd", image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"scan_7": [{"slice": 3, "box": [8, 6, 40, 30], "label": 2}]}))
    root = decathlon(tmp_path / "ds", cases=1)  # the classes: dataset.json's
    dm = datamodule(root, predict_images=scans, predict_prompts=prompts)
    dm.setup("predict")
    batch = dm.datasets["predict"].collate([dm.datasets["predict"][0]])
    (predicted,) = predict_volumes(BoxModel(), batch)
    written = write_prediction(predicted, tmp_path / "out", dm.class_names)
    assert written.name == "scan_7.nrrd" and (tmp_path / "out" / "montages" / "scan_7.png").is_file()
    back, scan = sitk.ReadImage(str(written)), sitk.ReadImage(str(source))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(back, get)() == pytest.approx(getattr(scan, get)(), abs=1e-6), get
    values = sitk.GetArrayFromImage(back)
    assert set(np.unique(values).tolist()) == {0, 2}  # the prompt's label value
    # never vanishing, the object reaches every slice; it sits where the prompt put it: x the column, y the row
    assert values.reshape(6, -1).any(1).all()
    rows, cols = np.flatnonzero(values[3].any(1)), np.flatnonzero(values[3].any(0))
    assert 5 <= rows[0] <= 8 and 28 <= rows[-1] <= 30 and 7 <= cols[0] <= 10 and 38 <= cols[-1] <= 40


def test_embedding_cache_keys_tell_slices_of_one_volume_apart(tmp_path: Path) -> None:
    from segtune.methods.baseline import DecoderOnly

    volume = write_case(tmp_path / "case.nii.gz", phantom()[0])
    method = DecoderOnly("sam-tiny")
    method._fingerprint = "weights"  # what configure_model and the first step would compute
    method.preprocessing = preprocessing_for("sam-tiny")
    paths = [str(volume)] * 3
    slices = method._cache_keys(paths, ["z=3", "z=4", "z=3"])
    assert slices[0] != slices[1] and slices[0] == slices[2]
    assert method._cache_keys(paths)[0] not in slices  # a 2D image's key: the file alone


def test_scoring_encodes_each_slice_once_with_the_same_scores(tmp_path: Path) -> None:
    """Propagation prompts a slice once per object and direction, the ground-truth-box pass once more: the
    slice's encoder output is kept for all of them (LiteMedSAM's hippocampus test had encoded each slice
    about three times). Keeping it changes no prediction and no score."""
    from segtune.methods import LoRA
    from segtune.volume_scoring import score_case

    dm = datamodule(decathlon(tmp_path / "ds", cases=4))
    dm.setup("test")
    item = next(iter(dm.datasets["test"].collate([dm.datasets["test"][0]])["volumes"]))
    module = LoRA("sam-tiny")
    module.configure_model()
    module.eval()
    encoded, results = {}, {}
    for mib in (0, 64):
        seen = [0]

        def hook(m, args, kwargs, output, seen=seen) -> None:
            if type(m).__name__ == "SamVisionEncoder":
                seen[0] += len(args[0] if args else kwargs["pixel_values"])

        handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                results[mib] = score_case(module, item, VolumeScoring(slice_cache_mib=mib))
        finally:
            handle.remove()
        encoded[mib] = seen[0]
    slices_with_labels = int(np.isin(item["volume"].label, [1, 2]).reshape(len(item["volume"].label), -1).any(1).sum())
    assert encoded[64] <= len(item["volume"].label) and encoded[64] >= slices_with_labels
    print("encoder passes (uncached, kept):", encoded[0], encoded[64])
    assert encoded[0] > 2 * encoded[64], encoded
    np.testing.assert_array_equal(results[0][0], results[64][0])
    for a, b in zip(results[0][1], results[64][1], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
    # every protocol and option: each slice encoded once per case, whatever it prompts
    variants = [
        VolumeScoring(prompt="box2d", slice_cache_mib=64),
        VolumeScoring(mask_prompt=True, slice_cache_mib=64),
        VolumeScoring(prompt="box2d", mask_prompt=True, largest_component=True, slice_cache_mib=64),
    ]
    for scoring in variants:
        passes = encoder_passes(lambda scoring=scoring: score_case(module, item, scoring))
        assert slices_with_labels <= passes <= len(item["volume"].label), (scoring, passes)


def encoder_passes(run) -> int:
    """Images the SAM image encoder saw while ``run()`` ran (no gradient)."""
    seen = [0]

    def hook(m, args, kwargs, output) -> None:
        if type(m).__name__ == "SamVisionEncoder":
            seen[0] += len(args[0] if args else kwargs["pixel_values"])

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]

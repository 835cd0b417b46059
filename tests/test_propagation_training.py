"""Training for box propagation: slices prompted with a neighbouring slice's boxes, and past objects' ends."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from segtune.data.batch import collate
from segtune.data.dataset import InstanceDataset
from segtune.data.prompts import PromptConfig, mask_to_box
from segtune.data.slices import SliceRecord, VolumeOptions, slice_instances
from segtune.loss import SamLoss
from segtune.preprocessing import scale_coords
from tests.test_volumes import datamodule, decathlon, phantom, write_case

AUGMENT = [A.HorizontalFlip(p=0.5), A.Affine(rotate=(-10, 10), p=0.5)]


def _fit(root: Path, **kwargs):
    dm = datamodule(root, **kwargs)
    dm.setup("fit")
    return dm.datasets["fit"]


def _label(record: SliceRecord) -> np.ndarray:
    return record.store.get(record.case).label  # type: ignore[union-attr]


def test_off_gives_the_samples_of_before(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    train = _fit(root, volumes=VolumeOptions(empty_slices=0.5), augmentations=AUGMENT)
    assert all(not r.sources and not r.past_end and r.components is None for r in train.records)
    label = phantom()[1]
    foreground = int(label.reshape(len(label), -1).any(1).sum())
    assert len(train) == 2 * (foreground + round(0.5 * (len(label) - foreground)))  # no slice added

    def before(index: int):
        """The code before propagation: the plain dataset's sample, zero targets on an empty_slices pick."""
        sample = InstanceDataset.__getitem__(train, index)
        if train.records[index].prompt_from is not None:
            sample["masks"] = torch.zeros_like(sample["masks"])
            sample["low_res_masks"] = torch.zeros_like(sample["low_res_masks"])
        return sample

    # the same seed gives the same samples in order: no draw added anywhere (augmentations included)
    torch.manual_seed(0)
    expected = [before(i) for i in range(len(train))]
    torch.manual_seed(0)
    got = [train[i] for i in range(len(train))]
    for old, new in zip(expected, got, strict=True):
        for key in ("input_boxes", "boxes", "masks", "low_res_masks", "category_ids", "pixel_values"):
            assert torch.equal(old[key], new[key]), key
    # the offset alone changes nothing
    other = _fit(root, volumes=VolumeOptions(empty_slices=0.5, propagation_offset=1))
    assert [(r.case, r.index, r.prompt_from) for r in other.records] == [
        (r.case, r.index, r.prompt_from) for r in train.records
    ]


def test_a_neighbours_box_prompts_this_slices_target(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    train = _fit(root, volumes=VolumeOptions(propagation_prompts=1.0), prompts=PromptConfig(box_jitter=0.05))
    torch.manual_seed(0)
    from_neighbour = jittered = 0
    for i, record in enumerate(train.records):
        label, k = _label(record), record.index
        assert record.sources and all(0 < abs(j - k) <= 2 for j in record.sources)
        sample = train[i]
        classes = sample["category_ids"].tolist()
        assert classes
        boxes = sample["boxes"].numpy()
        # the prompts are the boxes of one source slice's objects, the targets this slice's masks of them
        found = [
            j for j in record.sources
            if sorted(classes) == sorted(np.unique(label[j][label[j] > 0]) - 1)
            and all(np.array_equal(b, mask_to_box(label[j] == c + 1)) for b, c in zip(boxes, classes, strict=True))
        ]  # fmt: skip
        assert found, (record.index, classes)
        for mask, c in zip(sample["masks"], classes, strict=True):
            assert np.array_equal(mask.numpy(), label[k] == c + 1)
        from_neighbour += any(
            not (label[k] == c + 1).any() or not np.array_equal(b, mask_to_box(label[k] == c + 1))
            for b, c in zip(boxes, classes, strict=True)
        )
        # jittered as any training box: each side within 5 % of the box's size
        size, reshaped = sample["original_size"], sample["reshaped_size"]
        tight = scale_coords(sample["boxes"], size, reshaped)
        span = (tight[:, 2:] - tight[:, :2]).repeat(1, 2)
        assert ((sample["input_boxes"] - tight).abs() <= 0.05 * span + 1e-4).all()
        jittered += not torch.equal(sample["input_boxes"], tight)  # a box under 1 px after jitter is kept as is
    assert from_neighbour > len(train) // 2  # the neighbour's box is not this slice's
    assert jittered > len(train) // 2


def test_past_the_end_slices_have_empty_targets_that_count_in_the_loss(tmp_path: Path) -> None:
    root = decathlon(tmp_path / "ds")
    train = _fit(root, volumes=VolumeOptions(propagation_prompts=0.5, empty_slices=0.0))
    label = phantom()[1]
    present = label.reshape(len(label), -1).any(1)
    ends = [s for s in range(len(label)) if not present[s] and present[max(0, s - 2) : s + 3].any()]
    assert ends == [0, 11]  # the phantom's objects span slices 1-10
    past = [r for r in train.records if r.past_end]
    assert sorted({r.index for r in past}) == ends and len(past) == 2 * len(ends)
    keys = {(str(r.path), r.image_key) for r in train.records}
    assert len(keys) == len(train.records)  # one record per slice: the embedding cache tells them apart

    torch.manual_seed(0)
    index = train.records.index(past[0])
    end = train[index]
    assert len(end["category_ids"]) and not end["masks"].any() and not end["low_res_masks"].any()
    j = [s for s in past[0].sources if np.array_equal(end["boxes"][0].numpy(), mask_to_box(label[s] == 1))]
    assert j and j[0] in (1, 2)  # label 1's box on its first slices prompts the slice before it
    middle = train[train.records.index(next(r for r in train.records if r.index == 6))]
    batch = collate([middle, end])
    n = len(end["category_ids"])
    assert batch["prompt_valid"][1, :n].all()  # a prompt, not padding

    # the loss pushes a mask on an empty target to nothing: a real term, unlike a padding prompt's
    loss = SamLoss()
    s = batch["low_res_masks"].shape[-1]
    logits = torch.full((2, batch["prompt_valid"].shape[1], 1, s, s), 3.0, requires_grad=True)
    iou = torch.zeros(logits.shape[:3])
    counted = loss(logits, iou, batch["low_res_masks"], batch["prompt_valid"])["loss"]
    padding = batch["prompt_valid"].clone()
    padding[1] = False
    assert not torch.isclose(counted, loss(logits, iou, batch["low_res_masks"], padding)["loss"])
    counted.backward()
    assert (logits.grad[1, :n] > 0).all()  # every pixel of the empty target's mask is pushed down
    alone = batch["prompt_valid"] & torch.tensor([[False], [True]])
    quiet = torch.full_like(logits, -3.0)
    target = batch["low_res_masks"]
    assert loss(quiet, iou, target, alone)["loss"] < loss(logits.detach(), iou, target, alone)["loss"]


def _two_components(root: Path, cases: int = 4) -> np.ndarray:
    """Label 1 as two volume components: a U (two bars on slices 2-6 joined on slice 6) and a block
    (slices 2-8)."""
    label = np.zeros((10, 32, 32), np.uint8)
    label[2:7, 4:10, 4:8] = 1
    label[2:7, 4:10, 14:18] = 1
    label[6, 4:10, 4:18] = 1
    label[2:9, 20:28, 20:28] = 1
    image = (np.random.default_rng(0).normal(300, 40, label.shape) + 900.0 * (label > 0)).astype(np.float32)
    for i in range(cases):
        write_case(root / "imagesTr" / f"case_{i:03d}.nii.gz", image)
        write_case(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    return label


def test_components_are_followed_as_volume_components(tmp_path: Path) -> None:
    label = _two_components(tmp_path / "ds")
    options = VolumeOptions(instances="components", propagation_prompts=1.0)
    train = _fit(tmp_path / "ds", volumes=options, prompts=PromptConfig(box_jitter=0.0))
    at = {r.index: i for i, r in enumerate(train.records) if r.case == 0}
    assert sorted(at) == list(range(10)) and [s for s in at if train.records[at[s]].past_end] == [0, 1, 9]
    record = train.records[at[3]]
    # on slice 3 the U's bars are two pieces of one object: one prompt, as scoring follows it
    assert len(slice_instances(label[3], [1], options)[0]) == 3 and len(record.objects(3)) == 2
    u = label.copy()
    u[:, 20:] = 0

    rng = np.random.default_rng(0)
    sample = train.propagated(at[7], 6, rng)  # the U ends on slice 6, the block goes on
    boxes = sorted(map(tuple, sample["boxes"].tolist()))
    assert boxes == sorted([tuple(mask_to_box(u[6]).tolist()), (20.0, 20.0, 28.0, 28.0)])
    for box, mask in zip(sample["boxes"].tolist(), sample["masks"], strict=True):
        assert np.array_equal(mask.numpy(), label[7] if box[0] == 20 else np.zeros_like(mask.numpy()))
    assert torch.equal(sample["input_boxes"], scale_coords(sample["boxes"], (32, 32), sample["reshaped_size"]))

    sample = train.propagated(at[3], 2, rng)  # on slice 3 the U's target holds both bars
    for box, mask in zip(sample["boxes"].tolist(), sample["masks"], strict=True):
        assert np.array_equal(mask.numpy(), (u if box[0] == 4 else label - u)[3].astype(bool))

    sample = train.propagated(at[1], 2, rng)  # before both objects begin
    assert len(sample["category_ids"]) == 2 and not sample["masks"].any()
    assert train.records[at[9]].sources == (7, 8)  # past the block's end: prompted from its last slices


def test_augmented_propagation_keeps_prompts_and_targets_together(tmp_path: Path) -> None:
    label = _two_components(tmp_path / "ds")
    flip = [A.HorizontalFlip(p=1.0)]
    options = VolumeOptions(instances="components", propagation_prompts=1.0)
    train = _fit(tmp_path / "ds", volumes=options, prompts=PromptConfig(box_jitter=0.0), augmentations=flip)
    at = {r.index: i for i, r in enumerate(train.records) if r.case == 0}
    sample = train.propagated(at[7], 6, np.random.default_rng(0))
    flipped = label[:, :, ::-1]
    for box, mask in zip(sample["boxes"].tolist(), sample["masks"], strict=True):
        block = box[2] == 32 - 20  # the block, flipped to x 4-12
        assert np.array_equal(mask.numpy(), flipped[7].astype(bool) if block else np.zeros((32, 32), bool))
    assert len(sample["masks"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [({"propagation_prompts": 1.5}, "propagation_prompts must be a fraction"),
     ({"propagation_offset": 0}, "propagation_offset must be 1 or more")],
)  # fmt: skip
def test_bad_propagation_settings_stop_in_one_line(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        VolumeOptions(**kwargs)

"""Corrective clicks (issue 32): where a click goes, that each round calls the model with every click and the
previous logits, that an oracle's Dice never drops, NoC as RITM defines it, and `segtune test` with clicks."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from segtune.click_rounds import ClickScoring, click_curves
from segtune.click_scores import clicks_to_reach, curve_scores, flatter_than_untuned, normalised_auc
from segtune.clicks import Click, VolumeClick, next_click, next_volume_click
from segtune.postprocess import predictions
from segtune.preprocessing import Preprocessing
from tests.conftest import CONFIGS


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- placement ----------------------------------------------------------------------------------------------
def test_a_missed_square_gets_a_positive_click_at_its_centre_and_a_false_blob_a_negative_one() -> None:
    target = np.zeros((40, 50), bool)
    target[10:21, 20:31] = True  # 11 x 11: one centre pixel
    assert next_click(np.zeros_like(target), target, rng()) == Click(15, 25, True)
    pred = target.copy()
    pred[30:37, 2:9] = True  # a 7 x 7 false blob
    assert next_click(pred, target, rng()) == Click(33, 5, False)
    assert next_click(target, target, rng()) is None  # nothing to correct


def test_the_largest_error_region_is_clicked_and_the_image_edge_is_a_border() -> None:
    target = np.zeros((40, 40), bool)
    target[0:9, 0:40] = True  # a band along the top edge, missed: 360 pixels
    pred = np.zeros_like(target)
    pred[25:35, 25:35] = True  # a 10 x 10 false blob: 100 pixels
    click = next_click(pred, target, rng())
    assert click.positive and click.y == 4  # the centre row of the band, not its edge row
    target[0:9] = False
    target[20:23, 0:3] = True  # now the false blob is the larger region
    assert not next_click(pred, target, rng()).positive


def test_ties_are_broken_by_the_seed() -> None:
    target = np.zeros((30, 30), bool)
    target[10:20, 10:20] = True  # 10 x 10: four pixels share the largest distance to the border
    centres = {(c.y, c.x) for c in (next_click(np.zeros_like(target), target, rng(s)) for s in range(40))}
    assert centres == {(14, 14), (14, 15), (15, 14), (15, 15)}
    assert next_click(np.zeros_like(target), target, rng(3)) == next_click(np.zeros_like(target), target, rng(3))
    # two error regions of the same size: either can be clicked, by the seed
    pred = np.zeros_like(target)
    pred[0:5, 25:30] = True
    target[10:20, 10:20] = False
    target[22:27, 0:5] = True
    signs = {next_click(pred, target, rng(s)).positive for s in range(40)}
    assert signs == {True, False}


def test_the_random_rule_draws_a_seeded_error_pixel() -> None:
    target = np.zeros((20, 20), bool)
    target[5:10, 5:10] = True
    pred = np.zeros_like(target)
    pred[15:18, 15:18] = True
    clicks = [next_click(pred, target, rng(s), "random") for s in range(30)]
    assert all(target[c.y, c.x] != pred[c.y, c.x] and c.positive == target[c.y, c.x] for c in clicks)
    assert len({(c.y, c.x) for c in clicks}) > 5 and clicks[0] == next_click(pred, target, rng(0), "random")


def test_a_volume_click_is_the_centre_voxel_of_the_largest_3d_error_component() -> None:
    target = np.zeros((12, 30, 30), bool)
    target[2:9, 10:17, 4:11] = True  # a missed 7 x 7 x 7 cube
    pred = np.zeros_like(target)
    pred[0:2, 0:3, 25:28] = True  # a small false blob
    assert next_volume_click(pred, target, rng()) == VolumeClick(5, 13, 7, True)
    # the distance is measured in mm: a cube 3 slices thick at 5 mm is thicker than 13 pixels at 1 mm
    target[:] = False
    target[4:7, 0:13, 0:13] = True
    click = next_volume_click(np.zeros_like(target), target, rng(), spacing=(5.0, 1.0, 1.0))
    assert (click.slice, click.y, click.x) == (5, 6, 6)
    with pytest.raises(ValueError, match="shape"):
        next_volume_click(pred[0], target[0], rng())


# --- scores of the curve ------------------------------------------------------------------------------------
def ritm_noc(curve: list[float], threshold: float, max_clicks: int) -> int:
    """RITM's ``compute_noc_metric`` for one instance (isegm/inference/utils.py), restated: the 1-based index of
    the first score reaching the threshold, or ``max_clicks`` when none does."""
    for index, value in enumerate(curve):
        if value >= threshold:
            return index + 1
    return max_clicks


def test_noc_is_ritms_with_the_first_prompt_as_the_first_interaction() -> None:
    assert clicks_to_reach([0.5, 0.86, 0.95], 0.85) == 1 and clicks_to_reach([0.5, 0.86, 0.95], 0.9) == 2
    assert clicks_to_reach([0.92, 0.5], 0.9) == 0  # the box alone reaches it
    assert clicks_to_reach([0.1, 0.2, 0.3], 0.9) == 3  # never reached in R = 2 clicks: R + 1
    assert np.isnan(clicks_to_reach([float("nan"), 0.5], 0.9))
    generator = rng(7)
    for _ in range(200):
        rounds = int(generator.integers(1, 8))
        curve = list(np.clip(np.cumsum(generator.normal(0.05, 0.1, rounds + 1)) + 0.6, 0, 1))
        for t in (0.85, 0.9):
            assert clicks_to_reach(curve, t) == ritm_noc(curve, t, max_clicks=rounds + 2) - 1


def test_auc_and_curve_scores() -> None:
    assert normalised_auc([1.0, 1.0, 1.0]) == 1.0 and normalised_auc([0.0, 0.5, 1.0]) == 0.5
    dice = torch.tensor([[0.5, 0.86, 0.95], [0.95, 0.95, 0.95]])
    scores = curve_scores(dice, dice / 2)
    assert scores["dice_click_2"].tolist() == pytest.approx([0.95, 0.95])
    assert scores["noc_85"].tolist() == [1, 0] and scores["noc_90"].tolist() == [2, 0]
    assert scores["click_gain"].tolist() == pytest.approx([0.45, 0.0])
    assert scores["iou_click_1"].tolist() == pytest.approx([0.43, 0.475])


def test_a_flatter_click_curve_than_the_untuned_models_is_warned_about() -> None:
    paired = {"overall": {"mean": -0.05, "low": -0.08, "high": -0.02, "instances": 9}}
    report = {"overall": {"click_gain": 0.01}, "untuned": {"overall": {"click_gain": 0.06},
                                                         "difference": {"click_gain": paired}}}  # fmt: skip
    warning = flatter_than_untuned(report, 3)
    assert "flatter than the untuned model's" in warning and "-0.0500 [95% CI -0.0800, -0.0200]" in warning
    report["overall"]["click_gain"] = 0.07
    assert flatter_than_untuned(report, 3) is None
    assert flatter_than_untuned({"overall": {"click_gain": 0.0}}, 3) is None  # no untuned model


# --- the rounds -----------------------------------------------------------------------------------------------
SIZE = 32
PRE = Preprocessing(image_size=SIZE, mask_size=SIZE)


class OracleStandIn:
    """A stand-in module that records each call's inputs and segments, from the clicks, what a perfect model
    would: the previous mask (its mask input; without one, the box), plus each missed component holding a
    positive click, minus each false component holding a negative one. It knows an instance by its box."""

    def __init__(self, targets: dict[tuple[float, ...], torch.Tensor], mask_input: bool = True) -> None:
        self.targets = targets
        self.preprocessing = PRE
        allowed = {"input_boxes", "input_points", "input_labels"} | ({"input_masks"} if mask_input else set())
        self.sanitise = SimpleNamespace(allowed=allowed, model_name="OracleStandIn")
        self.calls: list[dict[str, Any]] = []

    def forward_encoded(self, batch: dict[str, Any], encoded: list[torch.Tensor]) -> Any:
        self.calls.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        masks = []
        for row, box in enumerate(batch["input_boxes"][:, 0].tolist()):
            target = self.targets[tuple(box)].numpy()
            if "input_masks" in batch:
                mask = batch["input_masks"][row, 0].numpy() > 0
            else:
                mask = _box_mask(box).numpy()
            points, labels = batch["input_points"][row, 0].tolist(), batch["input_labels"][row, 0].tolist()
            for (x, y), label in zip(points, labels, strict=True):
                errors = target & ~mask if label == 1 else mask & ~target
                found, _ = ndimage.label(errors, np.ones((3, 3)))
                component = found == found[int(y), int(x)] if found[int(y), int(x)] else np.zeros_like(mask)
                mask = mask | component if label == 1 else mask & ~component
            masks.append(torch.from_numpy(mask))
        logits = torch.stack(masks).float() * 20 - 10
        return SimpleNamespace(pred_masks=logits[:, None, None], iou_scores=torch.ones(len(masks), 1, 1))


def _box_mask(box: list[float]) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


BOXES = [[4.0, 4.0, 14.0, 14.0], [8.0, 8.0, 24.0, 24.0]]


def _instances() -> tuple[dict[str, Any], Any]:
    """Two instances of one 32 x 32 image, and the model's first output: each filled box."""
    one = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    one[4:14, 4:14] = True
    one[18:26, 20:28] = True  # a second part its box misses
    two = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    two[8:24, 8:24] = True
    two[12:16, 12:16] = False  # a hole its box covers
    batch = {
        "input_boxes": torch.tensor(BOXES)[None], "prompt_valid": torch.ones(1, 2, dtype=torch.bool),
        "reshaped_sizes": torch.tensor([[SIZE, SIZE]]), "original_sizes": torch.tensor([[SIZE, SIZE]]),
        "masks": [torch.stack([one, two])], "image_ids": [3],
    }  # fmt: skip
    logits = torch.stack([_box_mask(b) for b in BOXES]).float() * 20 - 10
    return batch, SimpleNamespace(pred_masks=logits[None, :, None], iou_scores=torch.ones(1, 2, 1))


def test_each_round_calls_the_model_with_every_click_and_the_previous_logits() -> None:
    batch, first_out = _instances()
    model = OracleStandIn({tuple(b): t for b, t in zip(BOXES, batch["masks"][0], strict=True)})
    first = predictions(first_out, batch, PRE)
    curves = click_curves(model, batch, [torch.zeros(1, 1)], first_out, first, 3, ClickScoring())
    dice = curves[0].dice
    assert dice[:, 0].tolist() == pytest.approx([2 * 100 / (164 + 100), 2 * 240 / (240 + 256)])
    assert (dice[:, 1:] >= dice[:, :-1] - 1e-6).all()  # an oracle's Dice never drops with a click
    assert dice[:, -1].tolist() == pytest.approx([1.0, 1.0])
    # the missed 8 x 8 square's centre, positive; the covered 4 x 4 hole's, negative (each of 4 tied pixels)
    ((x, y, positive),) = curves[0].clicks[0]
    assert positive and x in (23.5, 24.5) and y in (21.5, 22.5)
    ((x, y, positive),) = curves[0].clicks[1]
    assert not positive and x in (13.5, 14.5) and y in (13.5, 14.5)
    # round 1: both prompts, each with its box, its click and the first round's logits as the mask input
    call = model.calls[0]
    assert call["input_points"].shape == (2, 1, 1, 2) and call["input_boxes"][:, 0].tolist() == BOXES
    assert call["input_labels"][:, 0, 0].tolist() == [1, 0]
    assert call["input_points"][:, 0, 0].tolist() == [list(c[0][:2]) for c in curves[0].clicks]
    assert torch.equal(call["input_masks"][:, 0], first_out.pred_masks[0, :, 0])
    # both masks are right after one click: nothing left to click, no more calls; the curves stay flat
    assert len(model.calls) == 1 and dice[:, 1:].tolist() == [[1.0, 1.0, 1.0]] * 2


def test_later_rounds_get_every_earlier_click_and_the_last_logits() -> None:
    batch, first_out = _instances()
    third = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    third[28:31, 2:5] = True  # a third, smaller part: a second click
    one = batch["masks"][0][0] | third
    batch["masks"] = [torch.stack([one, batch["masks"][0][1]])]
    model = OracleStandIn({tuple(b): t for b, t in zip(BOXES, batch["masks"][0], strict=True)})
    first = predictions(first_out, batch, PRE)
    curves = click_curves(model, batch, [torch.zeros(1, 1)], first_out, first, 3, ClickScoring())
    assert [c["input_points"].shape[:3] for c in model.calls] == [(2, 1, 1), (1, 1, 2)]
    second = model.calls[1]
    assert torch.equal(second["input_points"][0, 0, 0], model.calls[0]["input_points"][0, 0, 0])
    assert second["input_points"][0, 0, 1].tolist() == [3.5, 29.5] and second["input_labels"].tolist() == [[[1, 1]]]
    assert torch.equal(second["input_masks"][0, 0] > 0, one & ~third)  # round 1's mask: all but the third part
    assert curves[0].dice[0, 1] < 1 and curves[0].dice[0, 2:].tolist() == [1.0, 1.0]


def test_a_model_without_mask_input_gets_the_clicks_alone() -> None:
    batch, first_out = _instances()
    model = OracleStandIn({tuple(b): t for b, t in zip(BOXES, batch["masks"][0], strict=True)}, mask_input=False)
    curves = click_curves(model, batch, [torch.zeros(1, 1)], first_out, predictions(first_out, batch, PRE), 2,
                          ClickScoring())  # fmt: skip
    assert model.calls and all("input_masks" not in c for c in model.calls)
    assert curves[0].dice[:, -1].tolist() == pytest.approx([1.0, 1.0])


def test_click_scoring_options_are_checked_in_one_line() -> None:
    with pytest.raises(ValueError, match="click_scoring.rule must be one of center, random"):
        ClickScoring(rule="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="click_scoring.seed"):
        ClickScoring(seed=-1)
    from segtune.methods import FullFinetune

    with pytest.raises(ValueError, match="model.init_args.clicks must be an integer >= 0, got -1"):
        FullFinetune(model="sam-tiny", clicks=-1)


# --- the CLI --------------------------------------------------------------------------------------------------
def test_segtune_test_with_clicks_writes_the_curve(run_cli, shapes_root: Path, capsys, caplog) -> None:
    common = ["--config", CONFIGS / "quickstart.yaml", "--data.init_args.root", shapes_root]
    run_cli("test", *common, "--trainer.callbacks+=segtune.callbacks.TestReport", "--trainer.callbacks.picture=false")
    with caplog.at_level(logging.WARNING):
        run_cli("test", *common, "--model.init_args.clicks", "2", "--trainer.callbacks+=segtune.callbacks.TestReport",
                "--trainer.callbacks.untuned=true", "--trainer.callbacks.worst_images=0")  # fmt: skip
    printed = capsys.readouterr().out
    plain, clicked = (json.loads(Path(f"runs/quickstart/version_{i}/test_metrics.json").read_text()) for i in (0, 1))
    assert "clicks" not in plain and "dice_click_1" not in plain["overall"]
    # the Dice after the box is today's Dice (the image encoded once, then decoded from its embedding)
    assert clicked["overall"]["dice"] == pytest.approx(plain["overall"]["dice"], abs=1e-5)
    curve = clicked["clicks"]["dice_curve"]["overall"]
    assert len(curve) == 3 and curve[1] == pytest.approx(clicked["overall"]["dice_click_1"])
    assert set(clicked["clicks"]["dice_curve"]) == {"overall", *plain["per_class"]}
    assert len(clicked["clicks"]["difference_curve"]) == 3  # the untuned model's, paired at each click
    assert clicked["overall"]["noc_90"] <= 3 and 0 <= clicked["overall"]["click_auc"] <= 1
    assert "Dice after" in printed and "2 clicks" in printed and "NoC@90" in printed
    assert Path("runs/quickstart/version_1/test_clicks.png").stat().st_size > 0
    with open("runs/quickstart/version_1/test_per_image.csv") as f:
        assert {"dice_click_2", "noc_85", "click_auc"} <= set(next(csv.DictReader(f)))


# --- predict: a box with positive and negative points for one object ------------------------------------------
def test_an_objects_json_gives_a_box_and_its_points_to_one_prompt(shapes_root: Path, tmp_path: Path) -> None:
    from segtune.data.datamodule import SegmentationDataModule
    from segtune.models.loading import load_model
    from segtune.models.sanitise import Sanitiser

    model, pre, _ = load_model("sam-tiny")
    test = shapes_root / "test"
    names = sorted(p.name for p in test.glob("*.jpg"))
    objects = {
        names[0]: [{"box": [10, 20, 90, 100], "points": [[40, 50, 1], [12, 22, 0]], "label": "star"},
                   {"box": [100, 100, 160, 150]}],
        Path(names[1]).stem: [{"box": [5, 5, 50, 60], "points": [[20, 20, 1]]}],
    }  # fmt: skip
    (tmp_path / "objects.json").write_text(json.dumps(objects))
    dm = SegmentationDataModule(
        shapes_root, predict_images=test, predict_prompts=tmp_path / "objects.json", batch_size=2, preprocessing=pre
    )
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    scale = pre.resized_shape(240, 320)[1] / 320
    assert batch["input_boxes"][0, 0].tolist() == pytest.approx([10 * scale, 20 * scale, 90 * scale, 100 * scale])
    assert batch["input_points"].shape == (2, 2, 2, 2)  # 2 images, 2 objects, 2 points (padded)
    assert batch["input_labels"].tolist() == [[[1, 0], [-10, -10]], [[1, -10], [-10, -10]]]
    assert batch["category_ids"][0].tolist() == [dm.class_names.index("star"), 0]
    inputs = Sanitiser(model)(batch)
    assert {"input_boxes", "input_points", "input_labels"} <= set(inputs)
    with torch.no_grad():  # the model takes both prompts of an object together
        assert model(**inputs, multimask_output=False).pred_masks.shape[:3] == (2, 2, 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([{"box": [10, 10, 5, 30]}], r"\"box\" \[10, 10, 5, 30\] is not an \[x0, y0, x1, y1\] box"),
        ([{"box": [10, 10, 50, 30], "point": [[1, 1, 1]]}], "unknown key 'point'"),
        ([{"box": [10, 10, 50, 30], "points": [[1, 1, 2]]}], r"is not a list of \[x, y, label\] points"),
        ([{"box": [10, 10, 50, 30], "points": [[1000, 1, 1]]}], "lies outside the 320x240 image"),
        ([{"label": "star"}], 'has neither "box" nor "points"'),
        ([{"box": [10, 10, 50, 30]}, {"points": [[1, 1, 1]]}], 'has no "box" where entry'),
        ([{"box": [10, 10, 50, 30]}, [1, 2, 3, 4]], "is not an object"),
    ],
)
def test_a_bad_objects_json_stops_in_one_line_naming_the_file_and_entry(
    shapes_root: Path, tmp_path: Path, entry: list, message: str
) -> None:
    from segtune.data.boxes import objects_records

    name = sorted(p.name for p in (shapes_root / "test").glob("*.jpg"))[0]
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({name: entry}))
    with pytest.raises(ValueError, match=message) as raised:
        objects_records(path, shapes_root / "test", ["cross", "star"])
    assert str(raised.value).startswith(f"{path}: entry {Path(name).stem!r}: ") and "\n" not in str(raised.value)


# --- training with click rounds ---------------------------------------------------------------------------------
class Recording:
    """Wraps a module's ``forward_encoded`` to record the prompts of each call."""

    def __init__(self, module: Any) -> None:
        self.module, self.calls = module, []
        self.preprocessing, self.sanitise, self.encode = module.preprocessing, module.sanitise, module.encode

    def forward_encoded(self, batch: dict[str, Any], encoded: list[torch.Tensor]) -> Any:
        self.calls.append({k: v for k, v in batch.items() if k.startswith("input_")})
        return self.module.forward_encoded(batch, encoded)


def test_click_training_takes_the_loss_on_a_drawn_rounds_prompts_and_changes_the_decoder(shapes_root: Path) -> None:
    from segtune.click_training import click_training_step
    from segtune.data.datamodule import SegmentationDataModule
    from segtune.data.prompts import ClickTraining
    from segtune.methods import DecoderOnly

    torch.manual_seed(0)
    module = DecoderOnly(model="sam-tiny", embedding_cache="off")
    module.configure_model()
    dm = SegmentationDataModule(shapes_root, preprocessing=module.preprocessing, batch_size=2)
    dm.setup("fit")
    batch = dm.train_dataloader().collate_fn([dm.datasets["fit"][0], dm.datasets["fit"][1]])
    prompts = int(batch["prompt_valid"].sum())
    recorded = Recording(module)
    # a seed whose first draw is round 3: two rounds without gradient, the third with it
    seed = next(s for s in range(50) if int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(s))) == 3)
    generator = torch.Generator().manual_seed(seed)
    out, targets, valid, rounds = click_training_step(recorded, batch, ClickTraining(rounds=3), generator)
    assert rounds == 3 and len(recorded.calls) == 4  # the first prompts, then rounds 1, 2 and 3
    assert "input_masks" not in recorded.calls[0]
    for r, call in enumerate(recorded.calls[1:], start=1):  # every click so far, the previous logits
        assert call["input_points"].shape == (prompts, 1, r, 2) and call["input_masks"].shape[:2] == (prompts, 1)
        assert torch.equal(call["input_boxes"][:, 0], batch["input_boxes"][batch["prompt_valid"]])
    assert torch.equal(recorded.calls[3]["input_points"][:, :, :2], recorded.calls[2]["input_points"])
    assert out.pred_masks.shape[:2] == (prompts, 1) and targets.shape[:2] == (prompts, 1) and valid.all()
    losses = module.loss(out.pred_masks, out.iou_scores, targets, valid)
    losses["loss"].backward()
    decoder = [p for n, p in module.named_parameters() if p.requires_grad]
    assert decoder and all(p.grad is not None for p in decoder)  # the drawn round's loss reaches the decoder
    # one step on click prompts moves the decoder: its output on a click prompt changes
    clicked = {**recorded.calls[3], "prompt_valid": valid}
    with torch.no_grad():
        rows = [level[batch["prompt_valid"].nonzero()[:, 0]] for level in module.encode(batch)]
        before = module.forward_encoded(clicked, rows).pred_masks
        torch.optim.SGD(decoder, lr=0.1).step()
        assert not torch.allclose(before, module.forward_encoded(clicked, rows).pred_masks)


def test_click_training_options_are_checked_in_one_line() -> None:
    from segtune.data.prompts import ClickTraining

    with pytest.raises(ValueError, match=r"data.init_args.prompts.clicks.rounds must be an integer >= 0, got -1"):
        ClickTraining(rounds=-1)
    with pytest.raises(ValueError, match="data.init_args.prompts.clicks.rule must be one of center, random"):
        ClickTraining(rule="edge")  # type: ignore[arg-type]


def test_a_fit_whose_best_epoch_listens_less_to_clicks_is_warned_about() -> None:
    from segtune.untuned import UntunedScore

    def rows(gains: list[float]) -> list[dict[str, Any]]:
        return [{"image_id": i, "instance": 0, "class": "a", "dice": 0.5, "dice_click_1": 0.5 + g, "click_gain": g}
                for i, g in enumerate(gains)]  # fmt: skip

    score = UntunedScore()
    score.untuned, score.best = {"rows": rows([0.2] * 6), "metrics": {}}, {"rows": rows([0.01] * 6), "epoch": 3}
    assert "flatter than the untuned model's: 1 clicks add +0.0100 Dice against +0.2000" in score.flatter_clicks()
    score.best = {"rows": rows([0.3] * 6), "epoch": 3}
    assert score.flatter_clicks() is None
    score.untuned["rows"] = [{k: v for k, v in r.items() if "click" not in k} for r in rows([0.2])]
    assert score.flatter_clicks() is None  # no clicks scored

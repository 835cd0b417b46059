"""SAM2-family memory propagation through volumes (``volume_scoring.propagation: memory``)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import segtune.volume_memory as volume_memory
from segtune.methods import FullFinetune, LoRA
from segtune.models.convert import VIDEO_MEMORY_FILE, convert_command, load_native, video_memory_state
from segtune.models.loading import load_model
from segtune.models.tiny import sam3tracker_tiny
from segtune.preprocessing import STANDARD_MEAN, STANDARD_STD, Preprocessing
from segtune.propagation import ObjectPrompt
from segtune.volume_memory import build_video_model, check_memory_support, propagate_memory, video_config, video_model
from segtune.volume_scoring import VolumeScoring, follow, predict_volumes
from tests.conftest import CONFIGS
from tests.test_convert import native_sam2, needs_sam2, randomise
from tests.test_volumes import datamodule, decathlon, phantom, write_case

MEMORY = VolumeScoring(propagation="memory")


def sam2_module(method=FullFinetune, model: str = "sam2-tiny-video"):
    module = method(model=model, volume_scoring=MEMORY)
    module.configure_model()
    return module.eval()


def volume(slices: int = 9) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    return SimpleNamespace(image=rng.random((slices, 40, 48), dtype=np.float32))


def record_frames(video: torch.nn.Module, monkeypatch) -> list[tuple[int, bool]]:
    """Every (slice, reverse) the video model runs on, in order."""
    calls: list[tuple[int, bool]] = []
    forward = video.forward

    def recorded(*args, **kwargs):
        calls.append((kwargs["frame_idx"], kwargs.get("reverse", False)))
        return forward(*args, **kwargs)

    monkeypatch.setattr(video, "forward", recorded)
    return calls


def foreground_for(calls: int, monkeypatch) -> None:
    """The model's masks: every pixel for the first ``calls`` slices it predicts, then nothing."""
    seen = []
    original = volume_memory.logits_to_original

    def logits(*args):
        out = original(*args)
        seen.append(1)
        return torch.full_like(out, 5.0 if len(seen) <= calls else -5.0)

    monkeypatch.setattr(volume_memory, "logits_to_original", logits)


def test_memory_propagation_runs_both_ways_from_the_prompted_slice(monkeypatch) -> None:
    module = sam2_module()
    frames = record_frames(video_model(module), monkeypatch)
    foreground_for(10**6, monkeypatch)  # objects that never vanish reach both ends
    box, points = np.array([5, 5, 30, 30], np.float32), np.array([[20, 20, 1], [5, 5, 0]], np.float32)
    outs = propagate_memory(module, volume(6), [2, 4], [box, points], min_pixels=1)
    assert [o.shape for o in outs] == [(6, 40, 48)] * 2 and all(o.dtype == bool for o in outs)
    assert all(o.reshape(6, -1).all(1).all() for o in outs)
    # each prompted slice once with its prompt, then forward to the last slice, then backward to the first
    assert frames[:5] == [(2, False)] + [(k, False) for k in range(2, 6)]
    assert frames[5:8] == [(k, True) for k in range(2, -1, -1)]
    assert frames[8:] == [(4, False), *[(k, False) for k in range(4, 6)], *[(k, True) for k in range(4, -1, -1)]]


def test_memory_propagation_stops_where_the_object_vanishes(monkeypatch) -> None:
    module = sam2_module()
    frames = record_frames(video_model(module), monkeypatch)
    foreground_for(3, monkeypatch)  # the prompted slice and the next two, then nothing
    box = np.array([5, 5, 30, 30], np.float32)
    (out,) = follow(module, volume(), None, [ObjectPrompt(4, box)], MEMORY, MEMORY.stop)
    assert np.flatnonzero(out.mask.reshape(9, -1).any(1)).tolist() == [4, 5, 6]
    # forward: one slice past the end; backward: the slice before the prompt is empty too
    assert frames == [(4, False), (4, False), (5, False), (6, False), (7, False), (4, True), (3, True)]


def test_memory_propagation_keeps_inside_a_known_range(monkeypatch) -> None:
    module = sam2_module()
    frames = record_frames(video_model(module), monkeypatch)
    foreground_for(10**6, monkeypatch)  # a model that never lets go: the range alone bounds it
    box = np.array([5, 5, 30, 30], np.float32)
    (out,) = follow(module, volume(), None, [ObjectPrompt(4, box, (3, 6))], MEMORY, MEMORY.stop)
    assert np.flatnonzero(out.mask.reshape(9, -1).any(1)).tolist() == [3, 4, 5, 6]
    assert max(k for k, _ in frames) <= 7 and min(k for k, _ in frames) >= 2  # one frame past each end at most


def test_predict_follows_the_given_prompt_by_memory(tmp_path: Path, monkeypatch) -> None:
    image, _ = phantom(shape=(5, 40, 48))
    scans = tmp_path / "scans"
    write_case(scans / "scan_1.nii.gz", image)
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"scan_1": [{"slice": 1, "box": [8, 6, 40, 30], "label": 2}]}')
    dm = datamodule(decathlon(tmp_path / "ds", cases=1), predict_images=scans, predict_prompts=prompts)
    dm.setup("predict")
    batch = dm.datasets["predict"].collate([dm.datasets["predict"][0]])
    module = sam2_module()
    frames = record_frames(video_model(module), monkeypatch)
    foreground_for(10**6, monkeypatch)
    (predicted,) = predict_volumes(module, batch)
    # every pixel foreground (the stand-in masks), every slice reached: the prompt's label everywhere
    assert predicted.label.shape == (5, 40, 48) and (predicted.label == 2).all()
    assert frames[0] == (1, False) and frames[-1] == (0, True)  # the video model followed it, both ways


def test_the_video_model_carries_the_fine_tuned_image_weights() -> None:
    module = sam2_module()
    with torch.inference_mode():  # as Lightning's validation and test build it
        video = video_model(module)
    assert type(video).__name__ == "Sam2VideoModel"
    image, memory = module.model.state_dict(), video.state_dict()
    assert set(image) < set(memory) and any(k.startswith("memory_attention.") for k in memory)
    assert all(torch.equal(image[k], memory[k]) for k in image)
    weight = "mask_decoder.output_hypernetworks_mlps.0.proj_out.weight"
    before = image[weight].clone()
    with torch.no_grad():  # a training step's change
        module.model.get_parameter(weight).add_(0.5)
    again = video_model(module)
    assert again is video  # built once, refreshed
    assert torch.equal(again.get_parameter(weight), module.model.get_parameter(weight))
    assert not torch.equal(again.get_parameter(weight), before)


def test_a_lora_model_is_merged_before_its_weights_are_copied() -> None:
    module = sam2_module(LoRA)
    with torch.no_grad():  # a trained adapter (a fresh one is the identity)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    merged = copy.deepcopy(module.model).merge_and_unload().state_dict()
    base = module.model.get_base_model()
    target = next(n for n, _ in base.named_modules() if n.endswith(".qkv")) + ".weight"
    video = video_model(module).state_dict()
    assert torch.allclose(video[target], merged[target], atol=1e-6)
    assert not torch.allclose(video[target], base.get_submodule(target[: -len(".weight")]).base_layer.weight)


def test_sam3tracker_propagates_with_its_own_video_model(monkeypatch) -> None:
    from transformers import AutoModelForMaskGeneration

    config = sam3tracker_tiny()
    for sub in (config.vision_config, config.prompt_encoder_config, config.mask_decoder_config):
        setattr(sub, "fpn_hidden_size" if sub is config.vision_config else "hidden_size", 128)
    torch.manual_seed(0)
    model = AutoModelForMaskGeneration.from_config(config).eval()
    module = SimpleNamespace(
        model=model, model_name="sam3tracker-tiny", device=torch.device("cpu"),
        preprocessing=Preprocessing(224, "square", 64, STANDARD_MEAN, STANDARD_STD),
    )  # fmt: skip
    foreground_for(10**6, monkeypatch)
    (out,) = propagate_memory(module, volume(5), [2], [np.array([5, 5, 30, 30], np.float32)], 1)
    assert type(module._video_model.model).__name__ == "Sam3TrackerVideoModel"
    assert out.shape == (5, 40, 48) and out.reshape(5, -1).all(1).all()


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("sam-tiny", "needs a SAM2-family model (Sam2, Sam3Tracker, MedSAM2), which has a video memory; "
         "'sam-tiny' is a SamModel: set propagation: box"),
        ("sam2-tiny", "'sam2-tiny' is 32 channels wide, which SAM2's video memory does not fit"),
    ],
)  # fmt: skip
def test_memory_on_a_model_without_a_fitting_memory_stops_in_one_line(
    model: str, says: str, tmp_path: Path, run_cli, capsys
) -> None:
    module = FullFinetune(model=model, volume_scoring=MEMORY)
    module.configure_model()
    with pytest.raises(ValueError, match="propagation memory"):
        check_memory_support(module.model, model)
    root = decathlon(tmp_path / "ds")
    with pytest.raises(SystemExit):
        run_cli("test", "--config", CONFIGS / "volumes_hippocampus.yaml", "--data.init_args.root", root,
                "--model.init_args.model", model, "--model.init_args.volume_scoring.propagation", "memory")  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segtune: error:")]
    assert len(err) == 1 and err[0].startswith("segtune: error: model.init_args.volume_scoring.propagation memory")
    assert says in err[0]


def test_segtune_test_with_memory_propagation_prints_the_volume_table(tmp_path: Path, run_cli, capsys, caplog) -> None:
    root = decathlon(tmp_path / "ds")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="segtune.volume_memory"):
        run = run_cli(
            "test", "--config", CONFIGS / "volumes_hippocampus.yaml", "--data.init_args.root", root,
            "--data.init_args.split_fractions", "[0.5, 0.25, 0.25]", "--model.init_args.model", "sam2-tiny-video",
            "--model.init_args.volume_scoring.propagation", "memory",
        )  # fmt: skip
    printed = capsys.readouterr().out
    assert "nsd" in printed and "slice dice" in printed and "left" in printed and "right" in printed
    assert "untrained random" in caplog.text  # the memory path ran (box propagation never builds a video model)
    assert (run / "runs/volumes_hippocampus/version_0/test_per_case.csv").is_file()


@needs_sam2
def test_a_native_sam2_file_supplies_its_memory_modules(tmp_path: Path, caplog) -> None:
    native = randomise(native_sam2(256), seed=3)  # SAM 2.1 Hiera-tiny by Meta's code, random values
    file = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": native}, file)
    model, _, _ = load_native(file, image_size=256)
    with caplog.at_level(logging.INFO, logger="segtune.volume_memory"):
        video, loaded = build_video_model(model, str(file))
    assert loaded and f"memory modules (160 tensors) loaded from {file}" in caplog.text
    assert "untrained random" not in caplog.text
    weights = video.state_dict()
    renamed = {  # native name -> transformers' Sam2VideoModel name, written out
        "maskmem_tpos_enc": "memory_temporal_positional_encoding",
        "no_obj_embed_spatial": "occlusion_spatial_embedding_parameter",
        "memory_attention.layers.3.cross_attn_image.out_proj.weight":
            "memory_attention.layers.3.cross_attn_image.o_proj.weight",
        "memory_attention.layers.0.norm2.bias": "memory_attention.layers.0.layer_norm2.bias",
        "memory_attention.norm.weight": "memory_attention.layer_norm.weight",
        "memory_encoder.mask_downsampler.encoder.4.weight":
            "memory_encoder.mask_downsampler.layers.1.layer_norm.weight",
        "memory_encoder.mask_downsampler.encoder.12.weight": "memory_encoder.mask_downsampler.final_conv.weight",
        "memory_encoder.fuser.layers.1.gamma": "memory_encoder.memory_fuser.layers.1.scale",
        "memory_encoder.pix_feat_proj.bias": "memory_encoder.feature_projection.bias",
        "obj_ptr_proj.layers.1.weight": "object_pointer_proj.layers.0.weight",
        "obj_ptr_proj.layers.2.bias": "object_pointer_proj.proj_out.bias",
        "obj_ptr_tpos_proj.weight": "temporal_positional_encoding_projection_layer.weight",
    }  # fmt: skip
    assert all(torch.equal(weights[hf], native[key]) for key, hf in renamed.items())
    memory = video_memory_state(native)
    assert set(memory) == set(weights) - set(model.state_dict())  # the memory modules, every one of them
    assert all(torch.equal(weights[k], v) for k, v in memory.items())
    torch.manual_seed(0)  # the random init build_video_model falls back to
    random = type(video)(video_config(model.config)).state_dict()
    assert not [k for k in memory if torch.equal(weights[k], random[k])]


@needs_sam2
def test_segtune_convert_keeps_the_memory_modules_for_the_folder(tmp_path: Path, caplog) -> None:
    native = randomise(native_sam2(256), seed=4)
    file = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": native}, file)
    folder = tmp_path / "medsam2"
    assert convert_command(["--checkpoint", str(file), "--output", str(folder), "--image-size", "256"]) == 0
    model, _, _ = load_model(str(folder))
    with caplog.at_level(logging.INFO, logger="segtune.volume_memory"):
        video, loaded = build_video_model(model, str(folder))
    assert loaded and f"loaded from {folder / VIDEO_MEMORY_FILE}" in caplog.text
    assert "untrained random" not in caplog.text
    weights = video.state_dict()
    memory = video_memory_state(native)
    assert set(memory) == set(weights) - set(model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in memory.items())

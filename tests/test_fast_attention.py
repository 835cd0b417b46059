"""The fused relative-position attention equals Hugging Face's eager and SDPA paths, values and gradients.

Every comparison runs the same module (same weights) before and after `install_fast_attention`, with
random non-zero relative-position tables (HF initialises them to zeros, which would hide a wrong fold).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SamConfig, SamHQConfig, SamHQModel, SamModel
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionAttention

from segtune.models.fast_attention import (
    _FusedRelPosForward,
    install_fast_attention,
    rel_pos_sdpa,
    uninstall_fast_attention,
)
from segtune.models.tiny import _DECODER, _SAM_VISION, sam2_tiny

IMAGE = 256  # 16 x 16 tokens: windowed layer 0 (window 4), global layer 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine they spin: 4 s vs 40 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(model_class: type[PreTrainedModel], **vision: object) -> SamConfig | SamHQConfig:
    prompt = dict(hidden_size=32, image_size=IMAGE, patch_size=16)
    if model_class is SamHQModel:
        return SamHQConfig(
            vision_config={**_SAM_VISION, **vision},
            prompt_encoder_config=prompt,
            mask_decoder_config=dict(_DECODER, vit_dim=64),
        )
    return SamConfig(
        vision_config={**_SAM_VISION, **vision}, prompt_encoder_config=prompt, mask_decoder_config=_DECODER
    )


def _model(model_class: type[PreTrainedModel], attn: str, seed: int = 0, **vision: object) -> PreTrainedModel:
    """A tiny random model with random relative-position tables, in evaluation mode."""
    torch.manual_seed(seed)
    model = model_class._from_config(_config(model_class, **vision), attn_implementation=attn)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_()
    return model.eval()


def _run(
    fn: Callable[[], torch.Tensor | list[torch.Tensor]], inputs: list[torch.Tensor], params: list[nn.Parameter]
) -> tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]]:
    """Outputs and gradients (w.r.t. inputs and params) of a fixed random projection of ``fn()``'s outputs."""
    for t in [*inputs, *params]:
        t.grad = None
    outs = fn()
    outs = outs if isinstance(outs, list) else [outs]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return [o.detach() for o in outs], grads


def _assert_same(a, b, tol: float = 1e-5) -> None:
    """Outputs and gradients agree within ``tol`` of each tensor's scale (its largest magnitude, at least 1).

    Gradients here are sums over thousands of terms (up to ~400 in size), where fp32 summation order
    alone moves the last digits: the scale keeps the check at fp32 rounding (~3e-7 seen) for every tensor.
    """
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    pairs = [(f"output {i}", x, y) for i, (x, y) in enumerate(zip(outs_a, outs_b, strict=True))]
    pairs += [(f"gradient {i}", x, y) for i, (x, y) in enumerate(zip(grads_a, grads_b, strict=True))]
    for name, x, y in pairs:
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, name
            error = (x.float() - y.float()).abs().max().item()
            scale = max(1.0, y.float().abs().max().item())
            assert error <= tol * scale, f"{name}: max error {error:.3g} > {tol:g} x scale {scale:.3g}"


def _encoder_fn(model: nn.Module, pixels: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    encoder = model.get_base_model().vision_encoder if hasattr(model, "get_base_model") else model.vision_encoder

    def fn() -> list[torch.Tensor]:
        out = encoder(pixels)
        return [out.last_hidden_state, *(getattr(out, "intermediate_embeddings", None) or [])]

    return fn


def test_fold_matches_dense_bias_on_a_non_square_grid() -> None:
    torch.manual_seed(0)
    batch, heads, kh, kw, dim = 2, 3, 3, 5, 7  # odd sizes: the head is padded to a multiple of 8
    q, k, v = (torch.randn(batch, heads, kh * kw, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rel_h = torch.randn(batch, heads, kh * kw, kh, dtype=torch.float64, requires_grad=True)
    rel_w = torch.randn(batch, heads, kh * kw, kw, dtype=torch.float64, requires_grad=True)
    leaves = [q, k, v, rel_h, rel_w]

    def dense() -> torch.Tensor:
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, kh * kw, kh * kw)
        return torch.softmax(0.3 * q @ k.transpose(-2, -1) + bias, dim=-1) @ v

    _assert_same(_run(dense, leaves, []), _run(lambda: rel_pos_sdpa(q, k, v, rel_h, rel_w, 0.3), leaves, []))
    with pytest.raises(ValueError, match="3 x 4 grid"):
        rel_pos_sdpa(q, k, v, rel_h, rel_w[..., :4], 0.3)


@pytest.mark.parametrize("model_class", [SamModel, SamHQModel])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "layer, grid",
    [(0, (4, 4)), (1, (16, 16)), (1, (16, 12))],
    ids=["windowed", "global", "global-non-square"],
)
def test_attention_module_matches_hf(model_class, attn: str, layer: int, grid: tuple[int, int]) -> None:
    block = _model(model_class, attn).vision_encoder.layers[layer]
    assert block.window_size == (4 if layer == 0 else 0)  # both layer kinds are exercised
    module = block.attn
    torch.manual_seed(2)
    # windowed layers see (batch * windows, window, window, C); 3 stands for several windows
    hidden = torch.randn(3, *grid, 64, requires_grad=True)
    params = list(module.parameters())
    expected = _run(lambda: module(hidden)[0], [hidden], params)
    assert install_fast_attention(block) == 1 and type(module).__name__.startswith("Fused")
    _assert_same(expected, _run(lambda: module(hidden)[0], [hidden], params))


@pytest.mark.parametrize(
    "model_class, vision",
    [
        (SamModel, {}),
        (SamHQModel, {}),
        (SamModel, dict(window_size=6)),  # 16 tokens do not split into windows of 6: padded windows
        (SamModel, dict(hidden_size=42, num_attention_heads=3)),  # SlimSAM-77-like head_dim 14 (168 / 12)
    ],
    ids=["sam", "samhq", "sam-padded-windows", "slimsam-head-dim-14"],
)
def test_encoder_matches_hf_eager_and_sdpa(model_class, vision: dict) -> None:
    eager, sdpa = _model(model_class, "eager", **vision), _model(model_class, "sdpa", **vision)
    sdpa.load_state_dict(eager.state_dict())
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, requires_grad=True)
    for model in (eager, sdpa):
        params = list(model.vision_encoder.parameters())
        expected = _run(_encoder_fn(model, pixels), [pixels], params)
        keys = list(model.state_dict())
        assert install_fast_attention(model) == 2
        assert list(model.state_dict()) == keys
        _assert_same(expected, _run(_encoder_fn(model, pixels), [pixels], params))
    # and HF's two paths agree with each other, so the fused one equals both
    uninstall_fast_attention(eager), uninstall_fast_attention(sdpa)
    _assert_same(
        _run(_encoder_fn(eager, pixels), [pixels], []), _run(_encoder_fn(sdpa, pixels), [pixels], []), tol=1e-4
    )


def test_sdpa_gets_no_mask_and_attention_dropout_only_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(dict(kwargs, width=args[0].shape[-1]))
        return sdpa(*args, **kwargs)

    module = _model(SamModel, "eager", attention_dropout=0.5).vision_encoder.layers[1].attn
    install_fast_attention(module)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    hidden = torch.randn(1, 16, 16, 64)
    module.eval()(hidden)
    module.train()(hidden)
    assert [c.get("attn_mask") for c in calls] == [None, None]
    assert [c["dropout_p"] for c in calls] == [0.0, 0.5]
    assert calls[0]["width"] == 32 + 16 + 16  # head_dim + key rows + key columns
    assert not torch.allclose(module.train()(hidden)[0], module.eval()(hidden)[0])


def test_lora_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    base = _model(SamModel, "sdpa")
    # random B as well as A, or LoRA would add zero and its A would get zero gradient
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*vision_encoder\..*\.qkv", init_lora_weights=False)
    model = get_peft_model(base, config)
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    expected = _run(_encoder_fn(model, pixels), [pixels], params)
    keys = list(model.state_dict())
    assert install_fast_attention(model) == 2
    assert type(base.vision_encoder.layers[0].attn.qkv).__module__.startswith("peft")
    assert list(model.state_dict()) == keys
    _assert_same(expected, _run(_encoder_fn(model, pixels), [pixels], params))


def test_gradient_checkpointing_and_output_attentions() -> None:
    model = _model(SamModel, "eager").train()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vision_encoder.layers)
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, requires_grad=True)
    params = list(model.vision_encoder.parameters())

    def with_attentions() -> list[torch.Tensor]:
        out = model.vision_encoder(pixels, output_attentions=True)
        # attention weights are for reporting: only the hidden state takes part in the loss
        attentions.append([a.detach() for a in out.attentions])
        return [out.last_hidden_state]

    attentions: list[list[torch.Tensor]] = []
    expected = _run(_encoder_fn(model, pixels), [pixels], params)
    expected_attentions = _run(with_attentions, [pixels], params)
    install_fast_attention(model)
    calls = []
    model.vision_encoder.layers[1].attn.register_forward_hook(lambda *_: calls.append(1))
    _assert_same(expected, _run(_encoder_fn(model, pixels), [pixels], params))
    assert len(calls) == 2  # the fused forward ran again in backward: checkpointing is on
    # asking for attentions switches nothing in the output, so the recomputation in backward matches
    _assert_same(expected_attentions, _run(with_attentions, [pixels], params))
    assert [a.shape for a in attentions[1]] == [(2 * 16, 16, 16), (2, 256, 256)]  # 16 windows x 2 heads
    for a, b in zip(attentions[0], attentions[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # module level, as transformers 4 called it
    hidden = torch.randn(1, 16, 16, 64)
    out, weights = model.vision_encoder.layers[1].attn(hidden, output_attentions=True)
    assert weights.shape == (2, 256, 256)
    uninstall_fast_attention(model)
    torch.testing.assert_close(weights, model.vision_encoder.layers[1].attn(hidden)[1], rtol=1e-5, atol=1e-6)


def test_sdpa_modules_keep_returning_no_attention_weights() -> None:
    model = _model(SamModel, "sdpa")
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        before = model.vision_encoder(pixels, output_attentions=True).attentions
        install_fast_attention(model)
        assert model.vision_encoder(pixels, output_attentions=True).attentions == before == ()


def test_install_is_idempotent_reversible_and_checkpoints_load_either_way() -> None:
    model = _model(SamHQModel, "eager")
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert install_fast_attention(model) == 2
    assert install_fast_attention(model) == 0
    attn = model.vision_encoder.layers[0].attn
    # still an instance of HF's class, so transformers' output-capturing hooks find it
    assert type(attn).__name__ == "FusedSamHQVisionAttention" and isinstance(attn, SamHQVisionAttention)
    assert type(copy.deepcopy(model).vision_encoder.layers[0].attn) is type(attn)  # module-level classes pickle
    fresh = _model(SamHQModel, "eager", seed=5)
    install_fast_attention(fresh)
    fresh.load_state_dict(plain_state)  # strict: same keys
    assert uninstall_fast_attention(fresh) == 2
    assert not any(isinstance(m, _FusedRelPosForward) for m in fresh.modules())
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, plain_state[k], rtol=0, atol=0)


def test_models_without_rel_pos_attention_are_untouched() -> None:
    from transformers import Sam2Model

    torch.manual_seed(0)
    model = Sam2Model(sam2_tiny()).eval()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        before = model.get_image_features(pixels)
    assert install_fast_attention(model) == 0
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        after = model.get_image_features(pixels)
    for a, b in zip(before.fpn_hidden_states, after.fpn_hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # SAM without relative positions: HF's SDPA path already has no bias, nothing to fold
    assert install_fast_attention(_model(SamModel, "eager", use_rel_pos=False)) == 0


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_bfloat16(mode: str) -> None:
    model = _model(SamModel, "sdpa")
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, dtype=next(model.parameters()).dtype)
    params = list(model.vision_encoder.parameters())

    def fn() -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            return [model.vision_encoder(pixels).last_hidden_state.float()]

    expected = _run(fn, [], params)
    install_fast_attention(model)
    got = _run(fn, [], params)
    # bf16 has 8 mantissa bits; the two paths round at different places
    torch.testing.assert_close(got[0][0], expected[0][0], rtol=0.05, atol=0.05)
    for a, b in zip(got[1], expected[1], strict=True):
        assert a.dtype == b.dtype and a.isfinite().all()
        assert (a.float() - b.float()).norm() <= 0.05 * b.float().norm() + 1e-3


# fp32 compute: only attention's fp32 rounding differs. bf16 compute (segtune's QLoRA default): that
# rounding crosses bf16 rounding boundaries in the next layer's 4-bit matmul (7e-4 of scale seen).
@pytest.mark.parametrize("compute_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)], ids=["fp32", "bf16"])
def test_qlora_4bit(tmp_path, compute_dtype: torch.dtype, tol: float) -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    _model(SamModel, "sdpa").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=["mask_decoder", "prompt_encoder"],
    )
    base = SamModel.from_pretrained(tmp_path, quantization_config=quantization).eval()
    for module in base.modules():  # as segtune.methods.qlora: keep bitsandbytes' trainable CPU layout
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    assert isinstance(base.vision_encoder.layers[1].attn.qkv, bnb.nn.Linear4bit)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*vision_encoder\..*\.qkv", init_lora_weights=False)
    model = get_peft_model(base, config)
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = _run(_encoder_fn(model, pixels), [pixels], params)
    assert install_fast_attention(model) == 2
    got = _run(_encoder_fn(model, pixels), [pixels], params)
    assert all(g is not None and g.abs().sum() > 0 for g in got[1])
    _assert_same(expected, got, tol=tol)

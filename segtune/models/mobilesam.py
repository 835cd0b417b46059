"""MobileSAM: SAM's prompt encoder and mask decoder (Hugging Face's) on a TinyViT image encoder.

MobileSAM (Zhang et al. 2023, github.com/ChaoningZhang/MobileSAM) distils SAM ViT-H's image encoder
into TinyViT-5M and keeps SAM's prompt encoder and mask decoder. transformers has no TinyViT, so the
encoder is written here in plain torch with the module names of MobileSAM's ``tiny_vit_sam.py``: a
converted ``mobile_sam.pt`` maps ``image_encoder.<name>`` to ``vision_encoder.<name>`` one to one.

The stages, as MobileSAM configures TinyViT-5M for a 1024 px input:

* patch embedding: two 3x3 stride-2 conv+BN layers (3 -> 32 -> 64 channels, 256 x 256 grid);
  LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch: MedSAM distilled into TinyViT at 256 px) uses
  two 1x1 stride-1 layers instead, so its stages run at 256, 128, 64 and 64 px
  (``patch_embed_kernel_size=1, patch_embed_stride=1``);
* stage 0: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, each with BN);
* stages 1-3: TinyViT blocks: windowed attention with a learned bias per head and relative offset,
  a 3x3 depthwise conv+BN between attention and MLP, a pre-norm MLP;
* patch merging between stages (1x1, 3x3 depthwise with the stage's stride, 1x1; MobileSAM's last
  merging keeps the 64 x 64 grid, stride 1);
* neck: 1x1 and 3x3 convs without bias, each followed by a channels-first LayerNorm, to 256 channels.

:class:`MobileSamConfig` and :class:`MobileSamModel` are registered with transformers' auto classes
on ``import segtune``, so ``AutoModelForMaskGeneration.from_pretrained(folder)`` reads a converted
or fine-tuned MobileSAM folder (``"model_type": "mobilesam"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration, PreTrainedConfig
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.sam.configuration_sam import SamConfig
from transformers.models.sam.modeling_sam import (
    SamLayerNorm,
    SamMaskDecoder,
    SamModel,
    SamPositionalEmbedding,
    SamPreTrainedModel,
    SamPromptEncoder,
    SamVisionEncoderOutput,
)

__all__ = [
    "FrozenStatisticsBatchNorm2d",
    "MobileSamConfig",
    "MobileSamModel",
    "MobileSamVisionConfig",
    "TinyViTVisionEncoder",
]


class MobileSamVisionConfig(PreTrainedConfig):
    r"""TinyViT image encoder as MobileSAM builds it (defaults: TinyViT-5M at 1024 px).

    Args:
        image_size: input side in pixels; the embedding grid is ``image_size`` divided by
            :attr:`downscale` (16 for MobileSAM, 4 for LiteMedSAM).
        num_channels: input channels.
        patch_embed_kernel_size: kernel of the two patch-embedding convs (MobileSAM 3, LiteMedSAM 1).
        patch_embed_stride: stride of each of them (MobileSAM 2, LiteMedSAM 1).
        embed_dims: channels of the four stages.
        depths: blocks per stage (stage 0 is MBConv, stages 1-3 attention).
        num_heads: attention heads per stage (stage 0 has none).
        window_sizes: attention window side per stage.
        downsample_strides: stride of the patch merging after stages 0, 1 and 2 (MobileSAM keeps the
            last one at 1 so the embedding grid is ``image_size // 16``).
        mlp_ratio: MLP hidden size over the stage width.
        mbconv_expand_ratio: MBConv hidden channels over the stage width.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        output_channels: neck channels (the mask decoder's width).
        num_pos_feats: random Fourier features of SAM's shared positional embedding.
        initializer_range: std of the random init of linear and conv weights.
    """

    base_config_key = "vision_config"
    model_type = "mobilesam_vision_model"

    image_size: int = 1024
    num_channels: int = 3
    patch_embed_kernel_size: int = 3
    patch_embed_stride: int = 2
    embed_dims: list[int] | tuple[int, ...] = (64, 128, 160, 320)
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: list[int] | tuple[int, ...] = (7, 7, 14, 7)
    downsample_strides: list[int] | tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    output_channels: int = 256
    num_pos_feats: int = 128
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # SamPositionalEmbedding draws its random features at this scale (a checkpoint overwrites them).
        self.scale = self.output_channels // 2
        super().__post_init__(**kwargs)

    @property
    def downscale(self) -> int:
        """Input pixels per embedding-grid cell along a side: the patch embedding's and merges' strides."""
        return self.patch_embed_stride**2 * math.prod(self.downsample_strides)


class MobileSamConfig(SamConfig):
    """:class:`~transformers.SamConfig` whose vision config is :class:`MobileSamVisionConfig`."""

    model_type = "mobilesam"
    sub_configs_defaults = {**SamConfig.sub_configs_defaults, "vision_config": MobileSamVisionConfig}


class FrozenStatisticsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics, in training too.

    A deliberate choice: fine-tuning runs at a few images per batch, whose statistics are a poor
    estimate of what the checkpoint's were (MobileSAM and LiteMedSAM were distilled at large
    batches), so updating them would shift every TinyViT activation the rest of the model was
    trained on. The affine weight and bias still train where the layer is trainable. The module
    itself follows ``train()``/``eval()`` like any other, so nothing else runs in eval mode.
    The state dict is BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Sequential):
    """Conv2d without bias, then BatchNorm with frozen statistics (MobileSAM's ``Conv2d_BN``:
    children ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", FrozenStatisticsBatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Frozen statistics make the BatchNorm an affine map: folded into the conv's weight and bias
        # (recomputed each call, so gradients reach both), one pass over the activations instead of two
        # (about 10% of a LiteMedSAM encoder pass on CPU).
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """Two conv+BN layers with a GELU between: 3x3 stride 2 each in MobileSAM (the input at a quarter
    of its side), 1x1 stride 1 in LiteMedSAM (full resolution)."""

    def __init__(self, cin: int, dim: int, kernel: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(cin, dim // 2, kernel, stride), nn.GELU(), ConvBN(dim // 2, dim, kernel, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(GradientCheckpointingLayer):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv at ``stride``, 1x1 conv; returns tokens and the new grid."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class TinyViTAttention(nn.Module):
    """Multi-head attention over a window with a learned bias per head and |dy|, |dx| offset.

    ``qkv`` packs, for each head in turn, its query, key and value (MobileSAM's layout).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))

    def bias(self) -> torch.Tensor:
        """``(heads, N, N)``: the bias of each query/key pair, looked up by their row and column offset."""
        w = self.window_size
        rows = torch.arange(w, device=self.attention_biases.device)
        coords = torch.stack(torch.meshgrid(rows, rows, indexing="ij")).flatten(1)  # (2, N), row-major
        offset = (coords[:, :, None] - coords[:, None, :]).abs()
        return self.attention_biases[:, offset[0] * w + offset[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias().to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class TinyViTMlp(nn.Module):
    """Pre-norm MLP (LayerNorm, fc1, GELU, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(GradientCheckpointingLayer):
    """Windowed attention (zero-padded to whole windows), depthwise conv, MLP; residuals around
    attention and MLP."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = TinyViTAttention(dim, num_heads, window_size)
        self.mlp = TinyViTMlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, channels, height, width)``; returns the same shape."""
        batch, channels, height, width = x.shape
        w = self.window_size
        tokens = x.permute(0, 2, 3, 1)
        pad_b, pad_r = -height % w, -width % w
        # As MobileSAM: padded positions are zeros before the attention's LayerNorm and are attended to.
        padded = F.pad(tokens, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = height + pad_b, width + pad_r
        windows = padded.view(batch, ph // w, w, pw // w, w, channels).transpose(2, 3).reshape(-1, w * w, channels)
        attended = self.attn(windows).view(batch, ph // w, pw // w, w, w, channels).transpose(2, 3)
        attended = attended.reshape(batch, ph, pw, channels)[:, :height, :width]
        tokens = tokens + attended
        x = self.local_conv(tokens.permute(0, 3, 1, 2))
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        return tokens.permute(0, 3, 1, 2)


class TinyViTStage(nn.Module):
    """A stage's blocks, then the patch merging into the next stage (none after the last)."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTVisionEncoder(nn.Module):
    """TinyViT image encoder with SAM's neck; takes ``pixel_values``, returns the image embeddings
    (``output_channels`` x ``image_size / downscale`` squared) as ``last_hidden_state``."""

    def __init__(self, config: MobileSamVisionConfig) -> None:
        super().__init__()
        self.config = config
        dims = list(config.embed_dims)
        self.patch_embed = PatchEmbed(
            config.num_channels, dims[0], config.patch_embed_kernel_size, config.patch_embed_stride
        )
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, config.depths, strict=True)):
            if i == 0:
                blocks = [MBConv(dim, config.mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(
                        dim, config.num_heads[i], config.window_sizes[i], config.mlp_ratio, config.local_conv_size
                    )
                    for _ in range(depth)
                ]
            merge = PatchMerging(dim, dims[i + 1], config.downsample_strides[i]) if i + 1 < len(dims) else None
            self.layers.append(TinyViTStage(blocks, merge))
        out = config.output_channels
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out, 1, bias=False),
            SamLayerNorm(out, eps=config.layer_norm_eps, data_format="channels_first"),
            nn.Conv2d(out, out, 3, padding=1, bias=False),
            SamLayerNorm(out, eps=config.layer_norm_eps, data_format="channels_first"),
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamVisionEncoderOutput:
        x = self.patch_embed(pixel_values)
        for stage in self.layers:
            x = stage(x)
        return SamVisionEncoderOutput(last_hidden_state=self.neck(x))


class MobileSamModel(SamModel):
    """:class:`~transformers.SamModel` with :class:`TinyViTVisionEncoder` as its image encoder.

    Prompt encoder, mask decoder, forward and outputs are SamModel's.
    """

    config_class = MobileSamConfig
    config: MobileSamConfig
    _no_split_modules = ["TinyViTBlock", "MBConv"]

    def __init__(self, config: MobileSamConfig) -> None:
        # SamModel.__init__ would build a ViT from the vision config: build the parts here instead.
        SamPreTrainedModel.__init__(self, config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = TinyViTVisionEncoder(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(config)
        # as SamModel: the decoder is not a PreTrainedModel and takes the attention backend from here
        config.mask_decoder_config._attn_implementation = config._attn_implementation
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TinyViTAttention):
            init.zeros_(module.attention_biases)


def register() -> None:
    """Make ``"model_type": "mobilesam"`` folders loadable by transformers' auto classes (idempotent)."""
    AutoConfig.register(MobileSamVisionConfig.model_type, MobileSamVisionConfig, exist_ok=True)
    AutoConfig.register(MobileSamConfig.model_type, MobileSamConfig, exist_ok=True)
    AutoModel.register(MobileSamConfig, MobileSamModel, exist_ok=True)
    AutoModelForMaskGeneration.register(MobileSamConfig, MobileSamModel, exist_ok=True)


register()

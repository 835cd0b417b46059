"""Fused relative-position attention for SAM-style ViT image encoders.

SAM's image encoder (also MedSAM, SlimSAM and SAM-HQ) adds a decomposed relative-position bias to
every attention logit::

    logits[i, j] = scale * q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]

Hugging Face's ``SamVisionAttention`` (and its SDPA variant, which passes the bias as ``attn_mask``)
materialises that bias as a dense ``(batch * heads, N, N)`` tensor; in the global layers of a 1024 px
encoder N is 4096. The bias is a sum of two low-rank terms, so it folds into an ordinary dot product
over a wider head::

    [scale * q_i, rel_h[i], rel_w[i]] . [k_j, onehot(row(j)), onehot(col(j))]

and :func:`torch.nn.functional.scaled_dot_product_attention` then runs with no mask at all, which lets
its fused (flash / memory-efficient / CPU flash) kernels run and never stores the N x N matrix.

The price is arithmetic: the q.k and p.v products run over ``head_dim + key_height + key_width`` channels
(64 -> 192 in ViT-B's global layers; v is zero-padded because flash kernels need one width) instead of
``head_dim``. Where attention is memory-bound (GPUs, where the dense bias and N x N probabilities
dominate) that is a good trade; on a CPU, where the kernels are compute-bound, the global layers are no
faster (see ``benchmarks/attention_speed.py``), the windowed ones somewhat faster.

:func:`install_fast_attention` switches the attention modules of a model to that path in place, by
changing their class to a subclass that only overrides ``forward``: parameters, buffers, state_dict
keys, peft adapters and bitsandbytes layers are untouched, so checkpoints load either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionAttention, SamHQVisionSdpaAttention

try:
    # transformers 5 records `output_attentions` through forward hooks on the attention modules and never
    # tells the module itself; the active collector is the only place the request is visible.
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers pass `output_attentions` to the module instead
    _active_collector = None

__all__ = [
    "FusedSamHQVisionAttention",
    "FusedSamHQVisionSdpaAttention",
    "FusedSamVisionAttention",
    "FusedSamVisionSdpaAttention",
    "install_fast_attention",
    "rel_pos_sdpa",
    "uninstall_fast_attention",
]

# Flash and memory-efficient kernels want the head width to be a multiple of 8 (16-byte rows in 16-bit
# dtypes); zero columns in both q and k add nothing to the logits.
_HEAD_ALIGN = 8


def rel_pos_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention with a decomposed relative-position bias, as one unmasked SDPA call.

    Computes ``softmax(scale * q @ k^T + rel_h[..., :, :, None] + rel_w[..., :, None, :]) @ v`` (the
    bias flattened to key index ``row * key_width + col``) without materialising the bias.

    Args:
        query: ``(..., Nq, head_dim)``.
        key: ``(..., Nk, head_dim)`` with ``Nk = key_height * key_width``, keys in row-major order.
        value: ``(..., Nk, head_dim_v)``.
        rel_h: ``(..., Nq, key_height)``: the height term for each query and key row.
        rel_w: ``(..., Nq, key_width)``: the width term for each query and key column.
        scale: multiplies ``q @ k^T`` only (the relative-position terms are added unscaled).
        dropout_p: dropout on the attention probabilities (pass 0.0 in evaluation).

    Returns:
        ``(..., Nq, head_dim_v)`` in the dtype of ``query``.

    Raises:
        ValueError: when the key length is not ``key_height * key_width``.
    """
    key_height, key_width = rel_h.shape[-1], rel_w.shape[-1]
    num_keys = key.shape[-2]
    if num_keys != key_height * key_width:
        raise ValueError(f"{num_keys} keys do not form a {key_height} x {key_width} grid")
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    folded = head_dim + key_height + key_width
    pad = -max(folded, value_dim) % _HEAD_ALIGN
    width = max(folded, value_dim) + pad
    dtype = query.dtype

    # Key j sits at row j // key_width and column j % key_width: its indicator picks rel_h[., row] and
    # rel_w[., col] out of the extended query. Zero columns pad the head to `width`.
    rows = torch.arange(key_height, device=key.device).repeat_interleave(key_width)
    cols = torch.arange(key_width, device=key.device).repeat(key_height)
    indicator = torch.zeros(num_keys, width - head_dim, device=key.device, dtype=dtype)
    indicator[torch.arange(num_keys, device=key.device), rows] = 1
    indicator[torch.arange(num_keys, device=key.device), key_height + cols] = 1

    # Explicit casts: under autocast the einsum-made rel_h/rel_w can come out in another dtype than q,
    # and SDPA needs one dtype for q, k and v.
    query = torch.cat(
        [query * scale, rel_h.to(dtype), rel_w.to(dtype), query.new_zeros(*query.shape[:-1], width - folded)], dim=-1
    )
    key = torch.cat([key.to(dtype), indicator.expand(*key.shape[:-1], -1)], dim=-1)
    # Flash kernels need v as wide as q and k; the extra output columns are zero and sliced off.
    value = F.pad(value.to(dtype), (0, width - value_dim))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=1.0)
    return out[..., :value_dim]


def _attentions_requested() -> bool:
    """Whether a transformers 5 ``capture_outputs`` caller is collecting attention weights right now."""
    if _active_collector is None:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


class _FusedRelPosForward:
    """``forward`` of a SAM vision attention module with the relative-position bias folded into SDPA.

    Mixed in ahead of the Hugging Face class, so ``self`` has that class's attributes (``qkv``, ``proj``,
    ``num_attention_heads``, ``scale``, ``dropout``, ``use_rel_pos``, ``rel_pos_h``, ``rel_pos_w``) and its
    ``get_rel_pos``. Head width is read from the ``qkv`` output, not from the config, so pruned models
    (SlimSAM) work.
    """

    # Eager modules return attention weights; HF's SDPA modules return None. Each fused class keeps its
    # base's contract.
    returns_attention_weights: bool = True

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over a ``(batch, height, width, channels)`` grid of tokens (a window or the whole image).

        Args:
            hidden_states: ``(batch, height, width, channels)``; windowed layers pass padded windows.
            output_attentions: also return the attention probabilities (eager-derived classes only).

        Returns:
            The projected output ``(batch, height, width, channels)`` and the attention probabilities
            ``(batch * heads, N, N)`` when requested from an eager-derived module, else None. The
            probabilities are computed beside the fused kernel without gradient: the output does not depend
            on whether they were requested, which keeps activation checkpointing's recomputation identical.
        """
        batch_size, height, width, _ = hidden_states.shape
        heads = self.num_attention_heads
        num_tokens = height * width
        # (3, batch, heads, N, head_dim), as HF splits it
        qkv = self.qkv(hidden_states).reshape(batch_size, num_tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        dropout_p = self.dropout if self.training else 0.0

        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = self._rel_pos_terms(query, height, width)
            out = rel_pos_sdpa(query, key, value, rel_h, rel_w, self.scale, dropout_p)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=self.scale)

        attn_weights = None
        if self.returns_attention_weights and (output_attentions or _attentions_requested()):
            attn_weights = self._attention_probs(query, key, rel_h, rel_w)

        out = out.permute(0, 2, 1, 3).reshape(batch_size, height, width, -1)
        return self.proj(out), attn_weights

    def _rel_pos_terms(self, query: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rel_h (batch, heads, N, height)`` and ``rel_w (batch, heads, N, width)`` from the unscaled query."""
        batch_size, heads, _, head_dim = query.shape
        # get_rel_pos interpolates the tables when the grid differs from the one they were trained for.
        table_h = self.get_rel_pos(height, height, self.rel_pos_h)
        table_w = self.get_rel_pos(width, width, self.rel_pos_w)
        grid = query.reshape(batch_size, heads, height, width, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).flatten(2, 3)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).flatten(2, 3)
        return rel_h, rel_w

    @torch.no_grad()
    def _attention_probs(
        self, query: torch.Tensor, key: torch.Tensor, rel_h: torch.Tensor | None, rel_w: torch.Tensor | None
    ) -> torch.Tensor:
        """HF eager's ``(batch * heads, N, N)`` attention probabilities (before dropout), for reporting only."""
        logits = (query * self.scale) @ key.transpose(-2, -1)
        if rel_h is not None and rel_w is not None:
            bias = rel_h[..., :, None] + rel_w[..., None, :]
            logits = logits + bias.reshape(logits.shape)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        return probs.flatten(0, 1)


class FusedSamVisionAttention(_FusedRelPosForward, SamVisionAttention):
    """``SamVisionAttention`` (eager) with the relative-position bias folded into SDPA."""


class FusedSamVisionSdpaAttention(_FusedRelPosForward, SamVisionSdpaAttention):
    """``SamVisionSdpaAttention`` with the relative-position bias folded into SDPA (no dense mask).

    Unlike HF's SDPA class, applies ``attention_dropout`` in training, as the eager class does (SAM
    checkpoints set it to 0.0). Attention weights stay None, as in HF's SDPA class.
    """

    returns_attention_weights = False


class FusedSamHQVisionAttention(_FusedRelPosForward, SamHQVisionAttention):
    """``SamHQVisionAttention`` (eager) with the relative-position bias folded into SDPA."""


class FusedSamHQVisionSdpaAttention(_FusedRelPosForward, SamHQVisionSdpaAttention):
    """``SamHQVisionSdpaAttention`` with the relative-position bias folded into SDPA (no dense mask).

    Unlike HF's SDPA class, applies ``attention_dropout`` in training, as the eager class does (SAM
    checkpoints set it to 0.0). Attention weights stay None, as in HF's SDPA class.
    """

    returns_attention_weights = False


# Exact classes only: a subclass of these might change forward, and its fused path would not be checked.
_FUSED: Mapping[type[nn.Module], type[nn.Module]] = MappingProxyType(
    {
        SamVisionAttention: FusedSamVisionAttention,
        SamVisionSdpaAttention: FusedSamVisionSdpaAttention,
        SamHQVisionAttention: FusedSamHQVisionAttention,
        SamHQVisionSdpaAttention: FusedSamHQVisionSdpaAttention,
    }
)


def install_fast_attention(model: nn.Module) -> int:
    """Make every SAM-style vision attention module of ``model`` fold its relative-position bias into SDPA.

    Finds modules whose class is exactly one of Hugging Face's ``SamVisionAttention``,
    ``SamVisionSdpaAttention``, ``SamHQVisionAttention`` or ``SamHQVisionSdpaAttention`` with
    ``use_rel_pos`` set (SAM, MedSAM, SlimSAM and SAM-HQ image encoders), anywhere in ``model``: a bare
    model, a peft ``PeftModel`` (LoRA on ``qkv``) or a bitsandbytes-quantised one. Each is switched in
    place to a subclass that only overrides ``forward``; parameter names and state_dict keys do not change.
    Models without such modules (``Sam2Model``, ``Sam3TrackerModel``...) are left as they are.

    Args:
        model: any module.

    Returns:
        How many modules were switched (0 when there were none, or they were already switched).
    """
    changed = 0
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None and getattr(module, "use_rel_pos", False):
            module.__class__ = fused
            changed += 1
    return changed


def uninstall_fast_attention(model: nn.Module) -> int:
    """Undo :func:`install_fast_attention`: switch fused modules back to their Hugging Face class.

    Args:
        model: any module.

    Returns:
        How many modules were switched back.
    """
    original = {fused: base for base, fused in _FUSED.items()}
    changed = 0
    for module in model.modules():
        base = original.get(type(module))
        if base is not None:
            module.__class__ = base
            changed += 1
    return changed

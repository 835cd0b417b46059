"""Forward + backward time of one SAM ViT-B attention layer: Hugging Face's eager and SDPA paths vs the fused one.

ViT-B geometry at 1024 px: hidden 768, 12 heads (head_dim 64), a 64 x 64 token grid in the global
layers and 14 x 14 windows (the grid padded to 70 x 70, 25 windows per image) in the others. Defaults:
fp32, batch 1 on CPU; bf16, batch 8 on CUDA. Implementations run round-robin within each repeat so that
load changes on a shared machine hit them alike; the table gives the median. Peak memory is measured on
CUDA only (allocator statistics); the CPU has no per-call equivalent.

    python benchmarks/attention_speed.py [--device cpu|cuda] [--layers global window] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention

from segtune.models.fast_attention import install_fast_attention

GRID = 64  # 1024 px / patch 16
WINDOW = 14
WINDOWS = math.ceil(GRID / WINDOW) ** 2  # 25: the 64 x 64 grid padded to 70 x 70


def build(config: SamVisionConfig, window_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """HF eager, HF SDPA and fused attention modules with the same random weights."""
    torch.manual_seed(0)
    eager = SamVisionAttention(config, window_size)
    with torch.no_grad():
        for param in eager.parameters():
            param.normal_(std=0.02)
        # checkpoints have non-zero tables; HF's zeros would let a wrong fold pass unnoticed
        eager.rel_pos_h.normal_()
        eager.rel_pos_w.normal_()
    sdpa = SamVisionSdpaAttention(config, window_size)
    sdpa.load_state_dict(eager.state_dict())
    fused = SamVisionAttention(config, window_size)
    fused.load_state_dict(eager.state_dict())
    assert install_fast_attention(fused) == 1
    # train(): the fine-tuning setting (attention dropout is 0.0 in SAM's configs)
    return {name: m.to(device, dtype).train() for name, m in [("hf eager", eager), ("hf sdpa", sdpa), ("fused", fused)]}


def step(module: nn.Module, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One forward + backward; returns the output (detached)."""
    hidden.grad = None
    module.zero_grad(set_to_none=True)
    out = module(hidden)[0]
    out.backward(grad)
    return out.detach()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Seconds and, on CUDA, peak MiB allocated above what was allocated before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20
    return time.perf_counter() - start, None


def measure(
    layer: str,
    config: SamVisionConfig,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
) -> None:
    """Time the three implementations on one layer kind and print their rows."""
    if layer == "global":
        shape, window_size, label = (batch, GRID, GRID), 0, f"global {GRID}x{GRID}"
    else:
        shape, window_size, label = (batch * WINDOWS, WINDOW, WINDOW), WINDOW, f"window {WINDOW}x{WINDOW} x{WINDOWS}"
    modules = build(config, window_size, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(*shape, config.hidden_size, generator=gen, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*shape, config.hidden_size, generator=gen, device=device, dtype=dtype)
    # the first warm-up step also gives the outputs compared in the last column
    outputs = {name: step(m, hidden, grad) for name, m in modules.items()}
    for _ in range(warmup - 1):
        for module in modules.values():
            step(module, hidden, grad)
    times: dict[str, list[float]] = {name: [] for name in modules}
    peaks: dict[str, float | None] = {}
    for _ in range(repeats):
        for name, module in modules.items():
            seconds, peak = timed(lambda m=module: step(m, hidden, grad), device)
            times[name].append(seconds)
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name], peak)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in modules:
        peak = "n/a" if peaks[name] is None else f"{peaks[name]:.0f}"
        diff = (outputs[name].float() - outputs["hf eager"].float()).abs().max().item()
        print(
            f"{label:<22} {name:<15} {1e3 * median[name]:>9.1f} {peak:>9} "
            f"{median['hf eager'] / median[name]:>10.2f}x {median['hf sdpa'] / median[name]:>9.2f}x {diff:>20.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--batch", type=int, default=None, help="images (default 1 on CPU, 8 on CUDA)")
    parser.add_argument("--layers", nargs="+", choices=["global", "window"], default=["global", "window"])
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 3 on CPU, 20 on CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batch = args.batch or (8 if cuda else 1)
    repeats = args.repeats or (20 if cuda else 3)
    config = SamVisionConfig(
        hidden_size=768, num_attention_heads=12, image_size=1024, patch_size=16, window_size=WINDOW
    )  # fmt: skip

    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"SAM ViT-B attention, forward + backward, {where}, {dtype}, batch {batch}, torch {torch.__version__}")
    print(f"median of {repeats} steps after {args.warmup} warm-up, implementations interleaved")
    header = f"{'layer':<22} {'implementation':<15} {'ms':>9} {'peak MiB':>9} {'eager/this':>11} {'sdpa/this':>10}"
    print(header + f" {'max |diff| vs eager':>20}")
    for layer in args.layers:
        measure(layer, config, batch, device, dtype, args.warmup, repeats)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

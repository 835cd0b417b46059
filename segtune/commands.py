"""``segtune models`` and ``segtune export``: the commands that are not Trainer runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from segtune.models.presets import PRESETS, ModelPreset


def _local_status(preset: ModelPreset) -> tuple[str, int | None]:
    """Where a preset's weights are, and its parameter count when its config is at hand."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig, AutoModelForMaskGeneration

    if preset.config is not None:
        config, where = preset.config(), "built-in (random)"
    else:
        cached = try_to_load_from_cache(preset.hub_id, "config.json")
        if not isinstance(cached, str):
            return "not downloaded", None
        config, where = AutoConfig.from_pretrained(Path(cached).parent), "HF cache"
    with torch.device("meta"):  # count parameters without allocating them
        model = AutoModelForMaskGeneration.from_config(config)
    return where, sum(p.numel() for p in model.parameters())


def models_command(argv: list[str]) -> int:
    """List the presets, or download one into the HF cache."""
    parser = argparse.ArgumentParser(prog="segtune models", description="List model presets or download one.")
    parser.add_argument("--download", metavar="NAME", help="fetch a preset's weights into the Hugging Face cache")
    args = parser.parse_args(argv)
    if args.download:
        preset = PRESETS.get(args.download)
        if preset is None or preset.hub_id is None:
            known = ", ".join(n for n, p in PRESETS.items() if p.hub_id)
            print(
                f"segtune models: {args.download!r} is not a downloadable preset (choose from {known})", file=sys.stderr
            )
            return 2
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(preset.hub_id)
        except Exception as e:  # no network, unknown repo, no disk: one line, not a traceback
            print(f"segtune models: could not download {preset.hub_id}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"{args.download}: {preset.hub_id} -> {path}")
        return 0
    rows = [("name", "class", "hub id", "params", "input", "local")]
    for preset in PRESETS.values():
        where, params = _local_status(preset)
        count = f"{params / 1e6:.1f}M" if params and params >= 1e6 else (f"{params / 1e3:.0f}k" if params else "?")
        rows.append((preset.name, preset.model_class, preset.hub_id or "-", count,
                     str(preset.preprocessing.image_size), where))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def export_command(argv: list[str]) -> int:
    """Write a checkpoint's adapter, or a merged HF model folder."""
    parser = argparse.ArgumentParser(
        prog="segtune export", description="Export a checkpoint as a PEFT adapter or a merged Hugging Face model."
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by segtune fit")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the base and write a plain HF model")
    args = parser.parse_args(argv)

    from peft import PeftModel

    import segtune.methods  # noqa: F401  (imports the method classes a checkpoint may name)
    from segtune.methods.base import load_method
    from segtune.models.adapters import load_adapter, save_adapter, save_merged
    from segtune.models.loading import load_model

    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        print(f"segtune export: {ckpt}: checkpoint not found", file=sys.stderr)
        return 2
    try:
        module = load_method(ckpt)
    except ValueError as e:
        print(f"segtune export: {e}", file=sys.stderr)
        return 2
    model, pre = module.model, module.preprocessing
    output = Path(args.output)
    if not isinstance(model, PeftModel):
        save_merged(model, pre, output)
        print(f"{type(model).__name__} written to {output}")
        return 0
    if not args.merge:
        save_adapter(model, pre, output)
        print(f"adapter written to {output}")
        return 0
    # Merge into a full-precision base (a QLoRA base is 4-bit): reload it and put the adapter on it.
    adapter_dir = output / "_adapter"
    save_adapter(model, pre, adapter_dir)
    base, _, _ = load_model(module.model_name)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    save_merged(merged, pre, output)
    for f in adapter_dir.iterdir():
        f.unlink()
    adapter_dir.rmdir()
    print(f"merged {type(merged).__name__} written to {output}")
    return 0

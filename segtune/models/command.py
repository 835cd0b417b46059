"""``segtune models``: list the model presets (where their weights are, their size) or download one."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from segtune.models.presets import PRESETS, ModelPreset


def _local_status(preset: ModelPreset) -> tuple[str, int | None]:
    """Where a preset's weights are, and its parameter count when its config is at hand."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig, AutoModelForMaskGeneration

    if preset.config is not None:
        config, where = preset.config(), "built-in (random)"
    elif preset.folder is not None:
        packaged = preset.packaged_file()
        if (Path(preset.folder) / "config.json").is_file():
            config, where = AutoConfig.from_pretrained(preset.folder), f"converted ({preset.folder})"
        elif packaged is not None:
            from segtune.models.convert import FAMILY, detect_family, read_checkpoint

            state = read_checkpoint(packaged)  # memory-mapped: the shapes, not the weights, are read
            config, where = FAMILY[detect_family(state)].config(state, None), f"installed package ({packaged})"
        elif preset.install is not None:
            return f"not installed (`{preset.install}`)", None
        else:
            return f"not converted ({preset.folder}; --download {preset.name} says how)", None
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
        if preset is not None and preset.folder is not None:
            raise ValueError(f"--download {args.download}: published as a native checkpoint: {preset.convert_hint()}")
        if preset is None or preset.hub_id is None:
            known = ", ".join(n for n, p in PRESETS.items() if p.hub_id)
            raise ValueError(f"--download: {args.download!r} is not a downloadable preset (choose from {known})")
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(preset.hub_id)
        except Exception as e:  # no network, unknown repo, no disk: one line, not a traceback
            raise ValueError(
                f"could not download {preset.hub_id}: {(str(e).splitlines() or [type(e).__name__])[0]}"
            ) from None
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

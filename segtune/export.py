"""``segtune export``: a checkpoint's LoRA adapter, or a merged Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from segtune.models.adapters import load_adapter, save_pretrained
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
        save_pretrained(model, pre, output)
        print(f"{type(model).__name__} written to {output}")
        return 0
    if not args.merge:
        save_pretrained(model, pre, output)
        print(f"adapter written to {output}")
        return 0
    # Merge into a full-precision base (a QLoRA base is 4-bit): reload it and put the adapter on it.
    adapter_dir = output / "_adapter"
    save_pretrained(model, pre, adapter_dir)
    base, _, _ = load_model(module.model_name)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    save_pretrained(merged, pre, output)
    for f in adapter_dir.iterdir():
        f.unlink()
    adapter_dir.rmdir()
    print(f"merged {type(merged).__name__} written to {output}")
    return 0

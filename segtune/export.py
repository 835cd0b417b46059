"""``segtune export``: a checkpoint's LoRA adapter, a merged Hugging Face model folder, or ONNX models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_command(argv: list[str]) -> int:
    """Write a checkpoint's adapter, or a merged HF model folder."""
    parser = argparse.ArgumentParser(
        prog="segtune export",
        description="Export a checkpoint as a PEFT adapter, a merged Hugging Face model or ONNX models.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by segtune fit")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the base and write a plain HF model")
    parser.add_argument(
        "--onnx", action="store_true",
        help="write image_encoder.onnx, decoder_boxes.onnx, decoder_points.onnx and onnx_model.json (LoRA merged "
        "first; needs the onnx extra)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.onnx:
        try:
            import onnx  # noqa: F401  (torch.onnx.export writes through it)
        except ImportError:
            print("segtune export: --onnx needs the onnx package: pip install 'segtune[onnx]'", file=sys.stderr)
            return 2

    from peft import PeftModel

    import segtune.methods  # noqa: F401  (imports the method classes a checkpoint may name)
    from segtune.methods.base import load_method
    from segtune.models.adapters import save_pretrained

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
    if args.onnx:
        from segtune.onnx_export import export_onnx

        plain = _merged(module, output) if isinstance(model, PeftModel) else model
        path = export_onnx(plain, pre, output, multimask_output=module.hparams.multimask_output)
        print(f"ONNX image encoder and prompt decoders of {type(plain).__name__} written to {output} ({path.name})")
        return 0
    if not isinstance(model, PeftModel):
        save_pretrained(model, pre, output)
        print(f"{type(model).__name__} written to {output}")
        return 0
    if not args.merge:
        save_pretrained(model, pre, output)
        print(f"adapter written to {output}")
        return 0
    merged = _merged(module, output)
    save_pretrained(merged, pre, output)
    print(f"merged {type(merged).__name__} written to {output}")
    return 0


def _merged(module, output: Path):
    """The checkpoint's LoRA merged into a full-precision base (a QLoRA base is 4-bit: it is reloaded)."""
    from segtune.models.adapters import load_adapter, save_pretrained
    from segtune.models.loading import load_model

    adapter_dir = output / "_adapter"
    save_pretrained(module.model, module.preprocessing, adapter_dir)
    base, _, _ = load_model(module.model_name)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    for f in adapter_dir.iterdir():
        f.unlink()
    adapter_dir.rmdir()
    return merged

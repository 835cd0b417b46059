"""``segtune export``: a checkpoint's LoRA adapter, a merged Hugging Face model folder, or ONNX models."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def export_command(argv: list[str]) -> int:
    """Write a checkpoint's adapter, or a merged HF model folder.

    Bad input raises (``OSError``, ``ValueError``, one line naming the file); ``segtune``'s main
    prints it as ``segtune: error: ...`` and exits 1. ``--output`` must be new or empty unless
    ``--overwrite``; it is written atomically (:func:`segtune.files.output_folder`).
    """
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
    parser.add_argument(
        "--overwrite", action="store_true",
        help="write into an --output folder that already holds files (the files it writes are replaced, others stay)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.onnx:
        try:
            import onnx  # noqa: F401  (torch.onnx.export writes through it)
        except ImportError:
            raise ValueError("--onnx needs the onnx package: pip install 'segtune[onnx]'") from None

    from peft import PeftModel

    import segtune.methods  # noqa: F401  (imports the method classes a checkpoint may name)
    from segtune.files import check_output_folder, output_folder
    from segtune.methods.base import load_method
    from segtune.models.adapters import save_pretrained

    output = Path(args.output)
    check_output_folder(output, args.overwrite)  # before the checkpoint is loaded: a refusal costs nothing
    module = load_method(Path(args.ckpt_path))
    model, pre = module.model, module.preprocessing
    with output_folder(output, args.overwrite) as scratch:
        if args.onnx:
            from segtune.onnx_export import export_onnx

            plain = _merged(module) if isinstance(model, PeftModel) else model
            path = export_onnx(plain, pre, scratch, multimask_output=module.hparams.multimask_output)
            done = f"ONNX image encoder and prompt decoders of {type(plain).__name__} written to {output} ({path.name})"
        elif not isinstance(model, PeftModel):
            save_pretrained(model, pre, scratch)
            done = f"{type(model).__name__} written to {output}"
        elif not args.merge:
            save_pretrained(model, pre, scratch)
            done = f"adapter written to {output}"
        else:
            merged = _merged(module)
            save_pretrained(merged, pre, scratch)
            done = f"merged {type(merged).__name__} written to {output}"
    print(done)
    return 0


def _merged(module):
    """The checkpoint's LoRA merged into a full-precision base (a QLoRA base is 4-bit: it is reloaded).

    The adapter goes through a temporary folder of the system's, never one inside the user's output.
    """
    from segtune.models.adapters import load_adapter, save_pretrained
    from segtune.models.loading import load_model

    with tempfile.TemporaryDirectory(prefix="segtune-adapter-") as adapter_dir:
        save_pretrained(module.model, module.preprocessing, adapter_dir)
        base, _, _ = load_model(module.model_name)
        return load_adapter(base, adapter_dir).merge_and_unload()

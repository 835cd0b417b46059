"""Allocator: segtune's training step on CPU with glibc's malloc defaults against ``ReuseFreedMemory``.

Each side of each case runs in its own process (the allocator's settings and history are the
process's), in rounds that alternate the sides, so a load that comes and goes reaches both. A side
is ``benchmarks/train_speed.py``'s segtune step through the Lightning Trainer (data loading
excluded), with segtune's default callback ``segtune.allocator.ReuseFreedMemory`` added ("reuse")
or not ("default"). The table gives the fastest step's wall, user-CPU and system-CPU seconds, the
step's minor page faults and the process's peak resident memory.

    python benchmarks/allocator_speed.py                       # LiteMedSAM (256 px) and ViT-B at 512 px
    python benchmarks/allocator_speed.py --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lightning.pytorch import Callback  # noqa: E402
from train_speed import Case, _load, model_folder, time_segtune  # noqa: E402

from segtune.allocator import ReuseFreedMemory, glibc  # noqa: E402
from segtune.data.synthetic import write_shapes_coco  # noqa: E402
from segtune.models.loading import preprocessing_for  # noqa: E402

CASES = {
    "LiteMedSAM full fine-tune": Case("LiteMedSAM full fine-tune", "full", vit="litemedsam", batch=2),
    "LiteMedSAM frozen encoder": Case("LiteMedSAM frozen encoder", "frozen", vit="litemedsam", batch=2),
    "ViT-B LoRA, 512 px": Case("ViT-B LoRA, 512 px", "lora", batch=1, size=512),
}


class StepFaults(Callback):
    """Minor page faults of this process during each training step."""

    def __init__(self) -> None:
        self.faults: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if batch_idx > 0:  # the warm-up step grows the heap once
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._start)


def child(name: str, reuse: bool, steps: int, work: Path) -> dict:
    """One side of one case, in this process."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    case = CASES[name]
    size = case.size or 256
    folder, weights = model_folder(case, size, work)
    data = work / f"data-{size}"
    if not data.exists():
        write_shapes_coco(data, {"train": case.batch * (steps + 1), "valid": 1}, (size, size), seed=0)
    faults = StepFaults()
    result = time_segtune(case, folder, data, steps, torch.device("cpu"), False, True,
                          callbacks=[faults, *([ReuseFreedMemory()] if reuse else [])])  # fmt: skip
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**result, "faults": min(faults.faults), "peak_gib": peak_kib / 2**20, "weights": weights,
            "px": preprocessing_for(str(folder)).image_size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--only", default=None, help="comma-separated case names (substring match)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.reuse, args.steps, args.work)), flush=True)
        return
    if glibc() is None:
        sys.exit("the C library is not glibc: ReuseFreedMemory does nothing here")
    names = [n for n in CASES if not args.only or any(s.strip().lower() in n.lower() for s in args.only.split(","))]
    best: dict[tuple[str, bool], dict] = {}
    loads = [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in names:
                for reuse in (False, True) if round_ % 2 == 0 else (True, False):
                    command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--work", tmp,
                               *(["--reuse"] if reuse else [])]  # fmt: skip
                    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                    r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
                    loads.append(_load())
                    side = "reuse" if reuse else "default"
                    print(f"round {round_ + 1} {name} {side}: {r['seconds']:.2f} s (user {r['user']:.2f}, "
                          f"system {r['system']:.2f}), {r['faults']} faults, peak {r['peak_gib']:.2f} GiB",
                          flush=True)  # fmt: skip
                    if (name, reuse) not in best or r["seconds"] < best[name, reuse]["seconds"]:
                        best[name, reuse] = r
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fastest of {args.rounds} rounds x {args.steps} steps per side; "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")  # fmt: skip
    print(
        "| case | batch | px | default s/step | reuse s/step | default / reuse | default user / system s "
        "| reuse user / system s | default / reuse page faults per step | default / reuse peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        d, r = best[name, False], best[name, True]
        print(f"| {name} | {CASES[name].batch} | {d['px']} | {d['seconds']:.2f} | {r['seconds']:.2f} | "
              f"{d['seconds'] / r['seconds']:.2f}x | {d['user']:.2f} / {d['system']:.2f} | "
              f"{r['user']:.2f} / {r['system']:.2f} | {d['faults']} / {r['faults']} | "
              f"{d['peak_gib']:.2f} / {r['peak_gib']:.2f} |")  # fmt: skip
    print("\nWeights: " + "; ".join(f"{n}: {best[n, False]['weights']}" for n in names))


if __name__ == "__main__":
    main()

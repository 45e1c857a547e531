"""Memory of one training step of ViT-S/16 at 224 px (the `tgo1` setting), measured on this machine.

Each batch size runs in a fresh process (peak resident memory, `ru_maxrss`, never goes down): model,
AdamW, forward, backward and step, float32 on the CPU (activations kept for backward dominate and
grow linearly with the batch). The peak at the `tgo1` batch of 256 is extrapolated from the line
through the measured batch sizes, and the probe pass (no grad, 250 images per batch) measured.

Prints, each alone on a line:
  train_peak_gb_batch_<B>: X      measured, per batch size
  train_peak_gb_batch_256_est: X  extrapolated (float32; bf16 autocast on a GPU keeps less)
  probe_peak_gb_batch_250: X      the geometry probe, all 44 site/views, float64 accumulators

    python benchmarks/memory.py [--batches 8,16,32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, warnings
import timm, torch
kind, batch = sys.argv[1], int(sys.argv[2])
model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100)
images, targets = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
if kind == "train":
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(2):  # the second step has AdamW's state allocated
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
else:
    from tgo.probe import probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe(model, [images])
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))  # KiB -> GiB
"""


def peak_gb(kind: str, batch: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(batch)], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,16,32")
    args = parser.parse_args()
    import numpy as np

    batches = [int(b) for b in args.batches.split(",")]
    peaks = [peak_gb("train", b) for b in batches]
    slope, intercept = np.polyfit(batches, peaks, 1)
    for b, p in zip(batches, peaks):
        print(f"train_peak_gb_batch_{b}: {p:.2f}")
    print(f"# {slope * 1024:.0f} MiB per image, {intercept:.2f} GiB fixed (model, AdamW, the process)")
    print(f"train_peak_gb_batch_256_est: {intercept + slope * 256:.1f}")
    print(f"probe_peak_gb_batch_250: {peak_gb('probe', 250):.2f}")


if __name__ == "__main__":
    main()

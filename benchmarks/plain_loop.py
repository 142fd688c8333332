"""The baseline: the open_clip loop a user writes by hand to rank a folder by a prompt.

Open each photo, open_clip's own ``preprocess``, batches of 32, ``encode_image``,
cosine with the prompt, sort, write a CSV. Same architecture as the benchmark's
``imgrank sort`` runs (ViT-B-32, random weights: speed does not depend on
weight values). Run by ``bench_sort.py`` as a separate process.

Usage: python benchmarks/plain_loop.py FOLDER PROMPT OUT.csv [WEIGHTS|none] [MODEL] [DEVICE]

MODEL defaults to ViT-B-32 (an open_clip name or a config JSON), DEVICE to cpu;
on a GPU the loop moves the model and each batch there, as users do (float32).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import open_clip
import torch
from PIL import Image


def main(
    folder: str,
    prompt: str,
    out: str,
    weights: str = "none",
    model_name: str = "ViT-B-32",
    device: str = "cpu",
) -> None:
    pretrained = None if weights == "none" else weights
    if model_name.endswith(".json"):  # a config file, as imgrank's --model takes it
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval().to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    scores: list[float] = []
    with torch.no_grad():
        text = model.encode_text(tokenizer([prompt]).to(device))
        text = text / text.norm(dim=-1, keepdim=True)
        for start in range(0, len(paths), 32):
            batch = torch.stack(
                [preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + 32]]
            )
            features = model.encode_image(batch.to(device))
            features = features / features.norm(dim=-1, keepdim=True)
            scores.extend((features @ text.T).squeeze(1).cpu().tolist())
    ranked = sorted(zip(scores, paths, strict=True), key=lambda item: -item[0])
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "score", "path"])
        for rank, (score, path) in enumerate(ranked, 1):
            writer.writerow([rank, f"{score:.6f}", path])


if __name__ == "__main__":
    main(*sys.argv[1:7])

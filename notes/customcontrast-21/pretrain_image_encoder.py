"""A small CLIP image encoder trained on toy-world views, for issue 21's demonstration (notes/customcontrast-21.md).

No real CLIP can be downloaded here, and the built-in `tiny` image encoder has random weights: its features carry
colour and layout, so two views of one subject on different backgrounds are no closer in them than two subjects on
the same background. CustomContrast assumes the opposite of its image encoder (ViT-L/14 features already separate
objects). This trains a CLIPVisionModelWithProjection of the tiny one's shape (hidden 32, 3 layers: the toy base's
MFI encoder reads 3 layers) with a symmetric InfoNCE loss (CLIP's, temperature 0.1) between two views of the same
subject — a new background, position, size and nearby object in each (bench/toyworld_views.draw_view) — over fresh
subjects every step, and saves it with `save_pretrained` so `persona-cli encoder train --image-encoder FOLDER` reads it.

It prints retrieval accuracy on held-out subjects (is a view's nearest other view the same subject?) before and
after, so the features are shown to mean something.

usage: python notes/customcontrast-21/pretrain_image_encoder.py OUT_FOLDER [--steps 1500] [--batch 32]
"""
import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from persona.bench.toyworld_views import draw_view, toy_subjects
from persona.services.models.customcontrast.build import clip_pixels

SIZE = 32


def views(subjects, rng, count=2):
    """(len(subjects) * count, 3, SIZE, SIZE): `count` views of each subject, subject-major."""
    return torch.stack([clip_pixels(draw_view(s, rng)[0], SIZE) for s in subjects for _ in range(count)])


@torch.no_grad()
def retrieval_accuracy(model, subjects, rng, count=4):
    model.eval()
    embeds = F.normalize(model(pixel_values=views(subjects, rng, count)).image_embeds, dim=-1)
    similarity = embeds @ embeds.T
    similarity.fill_diagonal_(-2)
    owner = torch.arange(len(subjects)).repeat_interleave(count)
    model.train()
    return float((owner[similarity.argmax(1)] == owner).float().mean())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="subjects per step, two views each")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
        patch_size=4, projection_dim=32))
    held_out = toy_subjects(64, random.Random(10_000 + args.seed))
    held_names = {s.name for s in held_out}
    print(f"retrieval before: {retrieval_accuracy(model, held_out, random.Random(1)):.3f}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    rng, started = random.Random(args.seed), time.time()
    for step in range(args.steps):
        subjects = [s for s in toy_subjects(args.batch + 8, rng) if s.name not in held_names][:args.batch]
        embeds = F.normalize(model(pixel_values=views(subjects, rng)).image_embeds, dim=-1)
        first, second = embeds[0::2], embeds[1::2]
        logits = first @ second.T / 0.1
        target = torch.arange(len(subjects))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - started:.0f} s", flush=True)
    print(f"retrieval after: {retrieval_accuracy(model, held_out, random.Random(1)):.3f}", flush=True)
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()

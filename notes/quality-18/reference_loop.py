"""A plain DreamBooth loop on the toy world, outside persona, to test the toy README's claim over subjects and seeds.

The README's "plain fine-tuning loop (not persona)": full UNet, lr 1e-4, prior preservation with 16 class images at
30 steps. What it leaves unsaid is chosen as diffusers' examples/dreambooth/train_dreambooth.py does by default:
AdamW (0.9, 0.999, weight decay 1e-2, eps 1e-8), grad-norm clip 1.0, epsilon loss in fp32, prior weight 1.0, uniform
timesteps, the frozen text encoder; `--batch` photos and as many class images per step (diffusers' default batch is
4). Class images: "a photo of a <class>", DDIM 30 steps, guidance 6 (the README's sampling guidance). Drawing:
diffusers' StableDiffusionPipeline, DDIM 30 steps, guidance 6, the same prompts and seeds as `persona-cli bench
quality --prompts 1`; scored by the README's measure (services/evaluate/toyworld.py, pure numpy).

usage: python notes/quality-18/reference_loop.py SUBJECT --seed S [--steps 800] [--batch 1] [--images 8]
prints one JSON line per caption kind (case1, case3) with the metrics of that seed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from persona.services.evaluate import toyworld  # the README's measure only

TOYWORLD = Path(__file__).resolve().parents[3] / "shared" / "toyworld"


def pipeline(base: Path, unet=None) -> StableDiffusionPipeline:
    trained = {"unet": unet} if unet is not None else {}  # else the base's own UNet
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, **trained)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompt: str, seeds, size: int) -> list[Image.Image]:
    images = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        images += pipe(prompt, height=size, width=size, num_inference_steps=30, guidance_scale=6.0,
                       generator=generator).images
    return images


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def train(base: Path, photos, captions, class_images, class_prompt, steps, batch, lr, seed, size, prior):
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).train()
    noise_scheduler = DDPMScheduler.from_pretrained(base / "scheduler")

    @torch.no_grad()
    def encode_text(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(images):
        pixels = torch.stack([to_tensor(i, size) for i in images])
        return vae.encode(pixels).latent_dist  # sampled per step, as the diffusers script does

    photo_latents, photo_text = encode_images(photos), encode_text(captions)
    class_latents, class_text = encode_images(class_images), encode_text([class_prompt] * len(class_images))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scale = vae.config.scaling_factor
    order = torch.Generator().manual_seed(seed)
    started = time.time()
    for step in range(steps):
        pick = torch.randint(len(photos), (batch,), generator=order) if batch < len(photos) else \
            torch.randperm(len(photos), generator=order)[:batch]
        latents = photo_latents.sample()[pick] * scale
        text = photo_text[pick]
        if prior:
            cpick = torch.randint(len(class_images), (batch,), generator=order)
            latents = torch.cat([latents, class_latents.sample()[cpick] * scale])
            text = torch.cat([text, class_text[cpick]])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text).sample
        if prior:
            instance, klass = prediction.chunk(2)
            noise_instance, noise_class = noise.chunk(2)
            loss = F.mse_loss(instance, noise_instance) + F.mse_loss(klass, noise_class)
        else:
            loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return unet.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("subject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--no-prior", action="store_true")
    parser.add_argument("--save", type=Path, help="folder for the drawn images (PNG)")
    args = parser.parse_args()
    base = TOYWORLD / "base"
    reference = toyworld.read_reference_set(TOYWORLD / "references" / args.subject)
    size = 64
    photos = [Image.open(p.path).convert("RGB") for p in reference.photos]
    class_prompt = f"a photo of a {reference.class_name}"
    started = time.time()
    class_images = draw(pipeline(base), class_prompt, [args.seed * 1000 + i for i in range(16)], size)
    prompts = toyworld.bench_prompts(reference, count=1)
    for kind in ("case1", "case3"):
        captions = [getattr(p, kind) for p in reference.photos]
        unet = train(base, photos, captions, class_images, class_prompt, args.steps, args.batch, args.lr, args.seed,
                     size, prior=not args.no_prior)
        pipe = pipeline(base, unet=unet)
        scores = []
        with torch.no_grad():
            for p_index, prompt in enumerate(prompts):
                seeds = [1000 * args.seed + 100 * p_index + i for i in range(args.images)]
                images = draw(pipe, prompt.text, seeds, size)
                scores += [toyworld.score_image(image, prompt, reference) for image in images]
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    for i, image in enumerate(images):
                        image.save(args.save / f"{args.subject}_s{args.seed}_{kind}_{prompt.kind}_{i}.png")
        row = dict(subject=args.subject, seed=args.seed, captions=kind, steps=args.steps, batch=args.batch,
                   lr=args.lr, prior=not args.no_prior, prompts=[p.text for p in prompts],
                   seconds=round(time.time() - started), **toyworld.summarise(scores))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

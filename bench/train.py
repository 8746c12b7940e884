"""Training benchmark: persona's training loop beside a plain diffusers-style reference loop, same process and device.

The reference loop is the inner loop of diffusers `examples/dreambooth/train_dreambooth_lora.py` (LoRA) and
`train_dreambooth.py` (DreamBooth, whole UNet) with prior preservation, batch B instance + B class images (the
examples' --train_batch_size, 1 by default; persona's TrainConfig.batch_size the same B). Every
step it preprocesses and tokenizes the batch as the example's dataset does, VAE-encodes the pixels, text-encodes
the prompts, noises the latents, runs the UNet once on both images, takes MSE + prior loss (chunked), backward,
clips, steps AdamW and the LR schedule. With fp16/bf16 on CUDA it does what the examples do under accelerate:
frozen weights cast to the half type, trainable weights in fp32, forward under autocast, a grad scaler for fp16.
On CPU both loops train in fp32.

Both loops run the same number of steps on the same images and prompts, from the same seed; speed is measured
over the steps after `warmup_steps` (CUDA synchronised at both ends), peak GPU memory over the whole run.
"""
from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from persona.services.models.base_models import missing_components
from persona.services.runtime.devices import describe_device, torch_device
from persona.services.runtime.errors import InvalidArgument
from persona.services.train.config import TrainConfig
from persona.services.train.loop import train
from persona.services.train.options import MIXED_PRECISIONS
from persona.services.train.regularizers import REGULARIZER_PLUGINS

# Methods both loops implement (textual inversion has no diffusers DreamBooth counterpart).
BENCH_METHODS = ("lora", "dreambooth")
# Methods timed with our loop only (no reference row; their ratio is vs our LoRA in the same run): textual inversion
# (one token embedding, no prior preservation), Custom Diffusion and SVDiff (with prior preservation, as trained).
OURS_ONLY_METHODS = ("ti", "custom_diffusion", "svdiff")
# Methods trained without class images.
NO_PRIOR_METHODS = ("ti",)
OURS, REFERENCE = "ours", "reference"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The examples' defaults: train_dreambooth_lora.py --learning_rate 1e-4 (train_dreambooth.py 5e-6), AdamW
# (0.9, 0.999, wd 1e-2, eps 1e-8), --max_grad_norm 1.0, --prior_loss_weight 1.0, constant LR schedule.
LEARNING_RATES = {"lora": 1e-4, "dreambooth": 5e-6}
LORA_RANK = 4
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass(frozen=True)
class BenchRow:
    """One loop's figures for one method."""

    method: str
    # "ours" (persona.services.train.loop.train) or "reference" (the diffusers-example loop in this module).
    loop: str
    # Timed steps (after warmup) and the seconds they took.
    steps: int
    seconds: float
    it_per_s: float
    # 1 / the median step time: steadier than it_per_s on a shared machine, where other work stalls a few steps.
    median_it_per_s: float
    # torch.cuda.max_memory_allocated over the whole run (loading included), bytes; None on CPU.
    peak_gpu_mem_bytes: int | None
    # it/s of this loop / it/s of the reference loop for the same method (1.0 on reference rows).
    vs_reference: float | None
    # Mean total loss of the timed steps, a sanity check that both loops train the same problem.
    mean_loss: float


# --- benchmark ---------------------------------------------------------------------------------------------------


def run_train_benchmark(
    base_model_dir: Path,
    methods: Sequence[str] = BENCH_METHODS,
    steps: int = 20,
    warmup_steps: int = 3,
    resolution: int | None = None,
    device: str | None = None,
    mixed_precision: str = "no",
    num_images: int = 4,
    images_dir: Path | None = None,
    seed: int = 0,
    on_run: Callable[[str, str], None] | None = None,
    regularizers: Sequence[str] = (),
    batch_size: int = 1,
) -> list[BenchRow]:
    """Trains each method with our loop and with the reference loop; returns rows (ours, reference) per method.

    `steps` are timed after `warmup_steps` untimed ones. `resolution` None: the model's native one. `device` None:
    cuda when available, else cpu. `mixed_precision` (no, fp16, bf16) applies on CUDA only; CPU runs are fp32.
    Images: `num_images` instance images from `images_dir` (jpg/png/webp, sorted), or random noise when None;
    as many noise images serve as class images for the prior-preservation term. `on_run(method, loop)` is called
    before each run starts (e.g. to show progress).

    `regularizers` ("mask", "spl", "core") add a row each: our LoRA loop with that regulariser (centred square
    masks for "mask"; the text encoder's LoRA on for "spl" and "core", which act on the text side), whose
    `vs_reference` is its it/s over plain LoRA's in the same run — what the regulariser costs.

    `methods` may also name OURS_ONLY_METHODS (ti, custom_diffusion, svdiff): one row each, our loop only, with the
    method's default learning rate; `vs_reference` is its it/s over our LoRA's when lora runs too, else None.

    `batch_size` B: instance photos per step in both loops, each with a class image (B + B images in one UNet
    call), at most `num_images`; a step then does B times the work, so compare it/s only at equal B.
    """
    import torch

    methods = tuple(methods)
    if not methods:
        raise InvalidArgument(f"`methods` is empty: pass one or more of {', '.join(BENCH_METHODS)}")
    for method in methods:
        if method not in BENCH_METHODS + OURS_ONLY_METHODS:
            raise InvalidArgument(f"`method` is {method!r}: use one of {', '.join(BENCH_METHODS + OURS_ONLY_METHODS)}")
    for regularizer in regularizers:
        if regularizer not in REGULARIZER_PLUGINS:
            raise InvalidArgument(f"`regularizers` has {regularizer!r}: use some of {', '.join(REGULARIZER_PLUGINS)}")
    if regularizers and "lora" not in methods:
        raise InvalidArgument("`regularizers` rows compare against plain LoRA: include lora in `methods`")
    if steps < 1:
        raise InvalidArgument(f"`steps` is {steps}: use 1 or more")
    if warmup_steps < 0:
        raise InvalidArgument(f"`warmup_steps` is {warmup_steps}: use 0 or more")
    if num_images < 1:
        raise InvalidArgument(f"`num_images` is {num_images}: use 1 or more")
    if not 1 <= batch_size <= num_images:
        raise InvalidArgument(f"`batch_size` is {batch_size}: use 1 to `num_images` ({num_images}), the photos a "
                              "step can hold")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise InvalidArgument(f"`resolution` is {resolution}: use a multiple of 8, e.g. 512")
    if mixed_precision not in MIXED_PRECISIONS:
        raise InvalidArgument(f"`mixed_precision` is {mixed_precision!r}: use one of {', '.join(MIXED_PRECISIONS)}")
    base_model_dir = Path(base_model_dir)
    missing = missing_components(base_model_dir)
    if missing:
        raise InvalidArgument(f"`base_model_dir` {base_model_dir} is not a diffusers Stable Diffusion folder: "
                              f"missing {', '.join(missing)}")
    dev = torch_device(device)
    precision = mixed_precision if dev.type == "cuda" else "no"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise InvalidArgument(f"`mixed_precision` bf16 is not supported by {describe_device(dev)}: use fp16 or no")

    instance = [(image, INSTANCE_PROMPT) for image in _instance_images(images_dir, num_images, seed)]
    klass = [(image, CLASS_PROMPT) for image in _noise_images(num_images, seed + 1)]
    total = warmup_steps + steps
    rows: list[BenchRow] = []
    plain_lora = None
    for method in (m for m in methods if m in BENCH_METHODS):
        if on_run is not None:
            on_run(method, OURS)
        ours = _measure(dev, lambda timer: _run_ours(base_model_dir, method, instance, klass, total, resolution,
                                                       dev, precision, seed, timer, batch_size=batch_size),
                      warmup_steps)
        if on_run is not None:
            on_run(method, REFERENCE)
        reference = _measure(dev, lambda timer: reference_train(base_model_dir, method, instance, klass, total,
                                                                  resolution, dev, precision, seed, timer,
                                                                  batch_size),
                             warmup_steps)
        rows.append(_row(method, OURS, ours, reference))
        rows.append(_row(method, REFERENCE, reference, reference))
        if method == "lora":
            plain_lora = ours
    for regularizer in regularizers:
        name = f"lora+{regularizer}"
        if on_run is not None:
            on_run(name, OURS)
        timed = _measure(dev, lambda timer: _run_ours(base_model_dir, "lora", instance, klass, total, resolution,
                                                        dev, precision, seed, timer, regularizer, batch_size),
                       warmup_steps)
        rows.append(_row(name, OURS, timed, plain_lora))
    for method in (m for m in methods if m in OURS_ONLY_METHODS):
        if on_run is not None:
            on_run(method, OURS)
        classes = [] if method in NO_PRIOR_METHODS else klass
        timed = _measure(dev, lambda timer: _run_ours(base_model_dir, method, instance, classes, total, resolution,
                                                        dev, precision, seed, timer, batch_size=batch_size),
                       warmup_steps)
        rows.append(_row(method, OURS, timed, plain_lora))
    return rows


class _StepTimer:
    """Marks the start of every step and the end of the last; times the steps after warmup, CUDA synchronised."""

    def __init__(self, device, warmup_steps: int):
        self.device, self.warmup_steps = device, warmup_steps
        self.started: float | None = None
        self.ended: float | None = None
        self.done = 0
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self._step_started = 0.0
        # torch.cuda.max_memory_allocated after the run, bytes; None on CPU.
        self.peak: int | None = None

    def _now(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step_begins(self) -> None:
        """Called before every step's work; the one after the warmup starts the clock."""
        if self.done == self.warmup_steps and self.started is None:
            self.started = self._now()
        if self.done >= self.warmup_steps:
            self._step_started = self._now()

    def step_ends(self, loss: float) -> None:
        self.done += 1
        if self.done > self.warmup_steps:
            self.ended = self._now()
            self.losses.append(loss)
            self.step_seconds.append(self.ended - self._step_started)


def _measure(device, run, warmup_steps: int) -> _StepTimer:
    """Runs `run(timer)` with fresh peak-memory counters and frees its models afterwards."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = _StepTimer(device, warmup_steps)
    run(timer)
    timer.peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timer


def _speed(timer: _StepTimer) -> tuple[float, float]:
    """(seconds of the timed steps, it/s over them)."""
    steps = len(timer.losses)
    seconds = (timer.ended - timer.started) if steps else 0.0
    return seconds, (steps / seconds if seconds > 0 else 0.0)


def _row(method: str, loop: str, timer: _StepTimer, reference: _StepTimer | None) -> BenchRow:
    steps = len(timer.losses)
    seconds, it_per_s = _speed(timer)
    ref_it_per_s = _speed(reference)[1] if reference is not None else 0.0
    median = statistics.median(timer.step_seconds) if timer.step_seconds else 0.0
    return BenchRow(method=method, loop=loop, steps=steps, seconds=seconds, it_per_s=it_per_s,
                    median_it_per_s=1.0 / median if median > 0 else 0.0, peak_gpu_mem_bytes=timer.peak,
                    vs_reference=(it_per_s / ref_it_per_s) if ref_it_per_s else None,
                    mean_loss=sum(timer.losses) / steps if steps else float("nan"))


def _run_ours(base_model_dir, method, instance, klass, total_steps, resolution, device, precision, seed,
              timer: _StepTimer, regularizer: str | None = None, batch_size: int = 1) -> None:
    """persona's loop with the reference's settings (+ one regulariser plugin); should_stop marks each step's
    start, on_step its end."""
    import numpy as np

    config = TrainConfig(method=method, steps=total_steps, learning_rate=LEARNING_RATES.get(method),
                         batch_size=batch_size, resolution=resolution, seed=seed, lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
                         lora_targets=LORA_TARGETS, mixed_precision=precision, device=str(device),
                         regularizers=(regularizer,) if regularizer else (),
                         train_text_encoder=regularizer in ("spl", "core"))
    masks = None
    if regularizer == "mask":  # the centre half of every photo is "subject"
        masks = []
        for image, _ in instance:
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[image.height // 4: 3 * image.height // 4, image.width // 4: 3 * image.width // 4] = True
            masks.append(mask)

    def should_stop() -> bool:
        timer.step_begins()
        return False

    output_dir = Path(tempfile.mkdtemp(prefix="persona-bench-"))
    try:
        result = train(base_model_dir, instance, config, output_dir, class_examples=klass, instance_masks=masks,
                       on_step=lambda step, losses, _: timer.step_ends(losses["loss"]), should_stop=should_stop)
        del result  # holds the trained models
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


# --- the reference loop ------------------------------------------------------------------------------------------


def reference_train(
    base_model_dir: Path,
    method: str,
    instance_examples: Sequence[tuple[Any, str]],
    class_examples: Sequence[tuple[Any, str]],
    steps: int,
    resolution: int | None = None,
    device: Any = "cpu",
    mixed_precision: str = "no",
    seed: int = 0,
    timer: _StepTimer | None = None,
    batch_size: int = 1,
) -> list[float]:
    """diffusers' DreamBooth example loop (LoRA or full UNet, prior preservation, `batch_size` instance + as many
    class images a step, as --train_batch_size); returns the losses.

    Nothing is cached: every step preprocesses and tokenizes its two images, VAE-encodes them and text-encodes
    their prompts, as train_dreambooth_lora.py / train_dreambooth.py do with their default options.
    """
    import torch

    device = torch.device(device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # accelerate.utils.set_seed
        return _reference_train(Path(base_model_dir), method, list(instance_examples), list(class_examples), steps,
                                resolution, device, mixed_precision, timer, batch_size)


def _reference_train(base_model_dir, method, instance_examples, class_examples, steps, resolution, device,
                     mixed_precision, timer, batch_size=1) -> list[float]:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    if method not in BENCH_METHODS:
        raise InvalidArgument(f"`method` is {method!r}: use one of {', '.join(BENCH_METHODS)}")
    if not instance_examples or not class_examples:
        raise InvalidArgument("the reference loop needs instance and class images (prior preservation)")

    # Load the models; the training noise schedule is DDPM.
    tokenizer = CLIPTokenizer.from_pretrained(base_model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base_model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base_model_dir, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_model_dir, subfolder="scheduler")
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = resolution or unet.config.sample_size * vae_scale

    # Only the trained part stays fp32; the frozen models go to the mixed-precision type (accelerator.mixed_precision).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    vae.to(device, **cast)
    text_encoder.to(device, **cast)
    if method == "lora":
        # train_dreambooth_lora.py: the UNet is frozen and cast, then gets fp32 adapters.
        unet.requires_grad_(False)
        unet.to(device, **cast)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
        if mixed_precision == "fp16":
            cast_training_params(unet, dtype=torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        # train_dreambooth.py: the whole UNet trains, in fp32.
        unet.to(device)
        unet.requires_grad_(True)
        params = list(unet.parameters())
    unet.train()
    text_encoder.eval()

    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATES[method], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    # accelerate: autocast around the prepared model's forward, a grad scaler for fp16.
    autocast = mixed_precision in ("fp16", "bf16") and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" and device.type == "cuda" else None
    # DreamBoothDataset with shuffle=True: instance i and class i (modulo their counts), in a shuffled order.
    length = max(len(instance_examples), len(class_examples))

    losses: list[float] = []
    order: list[int] = []
    for _ in range(steps):
        if timer is not None:
            timer.step_begins()
        indices = []
        # The DataLoader's next batch; a new shuffle when the epoch runs out (reading: a batch spans the epoch's end
        # rather than coming up short, so every step has the same shape).
        while len(indices) < batch_size:
            if not order:
                order = torch.randperm(length).tolist()
            indices.append(order.pop())
        instances = [instance_examples[i % len(instance_examples)] for i in indices]
        classes = [class_examples[i % len(class_examples)] for i in indices]
        # The dataset's transforms and tokenization, then collate_fn: the instances, then their class images.
        pixel_values = torch.stack([_example_transform(image, resolution) for image, _ in instances + classes])
        input_ids = tokenizer([prompt for _, prompt in instances + classes], truncation=True, padding="max_length",
                              max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        pixel_values = pixel_values.to(device, dtype=weight_dtype)
        input_ids = input_ids.to(device)

        # Convert images to latent space.
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        # Sample noise and a timestep per image, and noise the latents (forward diffusion).
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                  device=model_input.device).long()
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        # Get the text embedding for conditioning.
        encoder_hidden_states = text_encoder(input_ids)[0]
        # Predict the noise residual.
        with torch.autocast(device_type=device.type, dtype=weight_dtype, enabled=autocast):
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(model_input, noise, timesteps)
        # Chunk the prediction into instance and prior halves; loss = instance + prior_loss_weight * prior.
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = loss + 1.0 * prior_loss

        # Backward, clip, optimiser and schedule step.
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach().item())  # the examples log it every step
        if timer is not None:
            timer.step_ends(losses[-1])
    return losses


def _example_transform(image, resolution: int):
    """DreamBoothDataset's image_transforms: Resize(bilinear) + CenterCrop + ToTensor + Normalize([0.5], [0.5])."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --- images and base models --------------------------------------------------------------------------------------


def _noise_images(count: int, seed: int, side: int = 512) -> list:
    """`count` seeded random-noise RGB images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _instance_images(images_dir: Path | None, count: int, seed: int) -> list:
    if images_dir is None:
        return _noise_images(count, seed)
    from PIL import Image

    folder = Path(images_dir)
    if not folder.is_dir():
        raise InvalidArgument(f"`images_dir` {folder} is not a folder: pass a folder of jpg/png photos")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        raise InvalidArgument(f"`images_dir` {folder} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")
    return [Image.open(p).convert("RGB") for p in paths]

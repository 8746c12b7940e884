"""The one training loop: DreamBooth, LoRA and textual inversion on a diffusers Stable Diffusion folder.

Modelled on diffusers `examples/dreambooth/train_dreambooth_lora.py`: one typed option per knob, conflicts
rejected up front, and a loop that reads top to bottom. Methods are plugins (`methods/`); the loop never
branches on the method's name.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from persona.services.models.fusing import LEARNED_EMBEDS
from persona.services.runtime.devices import torch_device
from persona.services.runtime.errors import InvalidArgument
from persona.services.runtime.model_loading import loading_models

from .checkpoint import CHECKPOINT_FILE, TrainingState, run_fingerprint
from .config import TrainConfig
from .crop import to_tensor as _to_tensor
from .methods import METHODS, Components
from .methods.textual_inversion import add_learned_token
from .regularizers import REGULARIZER_PLUGINS, RegularizerInputs, weighted_pixel_mean


OnStep = Callable[[int, dict, float], None]
ShouldStop = Callable[[], bool]
# on_validation(step, [(prompt, PIL image), ...]) after the validation images of `step` are drawn.
OnValidation = Callable[[int, list], None]


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    method: str
    # The folder written, and the artifact in it (the pipeline folder itself for dreambooth).
    output_dir: Path
    artifact: Path
    # Steps actually taken (fewer than config.steps when should_stop ended the run).
    steps: int
    stopped: bool
    # Total loss per step, in order.
    losses: tuple[float, ...]
    seconds: float
    warnings: tuple[str, ...] = ()
    # The step the run resumed from (0: a fresh start).
    resumed_from: int = 0
    # The trained models in memory (e.g. to sample without reloading); not part of equality or repr.
    components: Components | None = field(default=None, repr=False, compare=False)


def train(
    base_model_dir: Path,
    examples: Sequence[tuple[Any, str]],
    config: TrainConfig,
    output_dir: Path,
    class_examples: Sequence[tuple[Any, str]] | None = None,
    on_step: OnStep | None = None,
    should_stop: ShouldStop | None = None,
    checkpoint_dir: Path | None = None,
    on_validation: OnValidation | None = None,
    instance_masks: Sequence[Any] | None = None,
    parent_embedding: tuple[str, Any] | None = None,
    negative_masks: Sequence[Any] | None = None,
) -> TrainResult:
    """Trains `config.method` on `examples` ((PIL image, caption) pairs) and saves it into `output_dir`.

    With `class_examples` the prior-preservation loss is added (Ruiz et al.): instance and class images go
    through the UNet in one batch, loss = instance + prior_loss_weight * prior. `on_step(step, losses,
    it_per_s)` is called after every step with {"loss", "instance", "prior"?}; `should_stop()` ends the run
    early (the weights so far are still saved). `instance_masks`: one bool (H, W) subject mask or None per
    example, for the masked loss. `negative_masks`: one bool (H, W) negative-click region or None per example,
    for a method that removes it from the photos (p3s with `p3s_region` negative_clicks). Regulariser plugins
    (`config.regularizers`) add their terms to the loss and to
    what `on_step` reports.

    `parent_embedding` (token, (1, hidden) tensor): a textual-inversion embedding learned before (CoRe's stage 1),
    added to the tokenizer and text encoder before the method prepares and kept frozen (the method must not train
    the text encoder), so captions with the token encode with it. A method that saves a whole pipeline carries it
    in its text encoder; any other gets it beside its weights as learned_embeds.safetensors.

    With `checkpoint_dir`, the full training state (trainable weights, optimiser, LR schedule, RNG, step) is
    written there atomically every `config.checkpoint_every` steps and when the run stops early; a later call
    with the same arguments resumes from it, and ends with the weights an uninterrupted run would have.
    """
    import torch

    config.validate()
    if not examples:
        raise InvalidArgument("`examples` is empty: pass at least one (image, caption) pair")
    device = torch_device(config.device)
    # Seed in a forked RNG: the run is reproducible and the caller's random stream is left alone.
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        return _train(Path(base_model_dir), list(examples), config, Path(output_dir),
                      list(class_examples or []), on_step, should_stop, device,
                      Path(checkpoint_dir) if checkpoint_dir is not None else None, on_validation,
                      list(instance_masks) if instance_masks is not None else [None] * len(examples),
                      parent_embedding, list(negative_masks) if negative_masks is not None else None)


def _train(base_model_dir, examples, config, output_dir, class_examples, on_step, should_stop, device,
           checkpoint_dir, on_validation, instance_masks, parent_embedding=None, negative_masks=None) -> TrainResult:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel, CLIPTokenizer

    started = time.perf_counter()
    warnings: list[str] = []

    # Building modules patches process-wide state: one load at a time (runtime.model_loading), adapters included.
    with loading_models():
        # 1. Load the components in fp32 whatever dtype the folder stores (fp16 folders and variants are common):
        #    the method prepares its weights in fp32, and frozen ones move to the compute dtype below.
        #    The training noise schedule is DDPM with the folder's scheduler config.
        components = Components(
            base_model_dir=base_model_dir,
            tokenizer=CLIPTokenizer.from_pretrained(base_model_dir, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(base_model_dir, subfolder="text_encoder", dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(base_model_dir, subfolder="vae", dtype=torch.float32),
            unet=UNet2DConditionModel.from_pretrained(base_model_dir, subfolder="unet", dtype=torch.float32),
            noise_scheduler=DDPMScheduler.from_pretrained(base_model_dir, subfolder="scheduler"),
        )
        vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        resolution = config.resolution or components.unet.config.sample_size * vae_scale
        if resolution % vae_scale:
            raise InvalidArgument(f"`resolution` is {resolution}: use a multiple of {vae_scale} for this base model")

        # 2. A parent's learned token joins the vocabulary first (frozen: the method must not train the text side).
        #    Then let the method freeze, unfreeze and add its weights (adapters, new token), and move to the device.
        method = METHODS[config.method]()
        if parent_embedding is not None:
            add_learned_token(components.tokenizer, components.text_encoder, *parent_embedding)
        method.prepare(components, config)
        if parent_embedding is not None and method.trains_text_encoder:
            raise InvalidArgument(f"`method` {config.method} trains the text side, so the parent's embedding would not "
                                  "stay frozen: use dreambooth or lora without `train_text_encoder`")
    for model in (components.text_encoder, components.vae, components.unet):
        model.to(device)
    components.vae.eval()
    components.unet.train()
    components.text_encoder.train(method.trains_text_encoder)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            components.text_encoder.gradient_checkpointing_enable()
    autocast, dtype = _autocast(device, config.mixed_precision, warnings)
    trained_dtype = _trained_dtype(device, config.trained_dtype, warnings)
    if dtype is not None and device.type == "cuda":
        # As the diffusers examples: frozen weights are stored in half precision (half the memory, no cast per
        # forward); what trains stays fp32 so small updates are not rounded away.
        for model in (components.text_encoder, components.vae, components.unet):
            model.to(dtype=dtype)
    if dtype is not None and device.type == "cuda" or trained_dtype != torch.float32:
        for param in method.trainable_parameters():
            param.data = param.data.to(trained_dtype)

    # 3. Encode every image once into its latent distribution (a fresh sample is drawn each step).
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    all_examples = examples + class_examples
    with torch.no_grad():
        pixels = torch.stack([_to_tensor(image, resolution) for image, _ in all_examples])
        dist = components.vae.encode(pixels.to(device, components.vae.dtype)).latent_dist
        latent_mean, latent_std = dist.mean.float(), dist.std.float()
    scaling = components.vae.config.scaling_factor
    # A method that conditions on the photos themselves (p3s) precomputes from them now.
    if len(instance_masks) != len(examples):
        raise InvalidArgument(f"`instance_masks` has {len(instance_masks)} entries for {len(examples)} examples")
    if negative_masks is not None:
        if len(negative_masks) != len(examples):
            raise InvalidArgument(f"`negative_masks` has {len(negative_masks)} entries for {len(examples)} examples")
        method.bind_negative_masks(negative_masks)
    warnings += method.bind_examples([image for image, _ in examples], instance_masks, resolution, device)

    # 4. Tokenize captions; cache their embeddings when the text encoder does not train.
    input_ids = components.tokenizer(
        [caption for _, caption in all_examples], padding="max_length", truncation=True,
        max_length=components.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    cached_text = None
    if not method.trains_text_encoder:
        with torch.no_grad():
            cached_text = components.text_encoder(input_ids)[0]

    # 5. Optimiser over the method's parameters, and the learning-rate schedule.
    params = method.trainable_parameters()
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.adam_weight_decay)
    else:
        # The fused CUDA kernel updates every tensor in one launch instead of several per tensor.
        fused = device.type == "cuda" and all(p.dtype == torch.float32 for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.adam_weight_decay,
                                      **({"fused": True} if fused else {}))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    noise_scheduler = components.noise_scheduler
    prediction_type = noise_scheduler.config.prediction_type
    n_instance, n_class = len(examples), len(class_examples)

    # Regulariser plugins: set up once, then asked for pixel weights and extra terms every step.
    regularizers = [REGULARIZER_PLUGINS[name](config) for name in config.regularizers]
    reg_inputs = RegularizerInputs(components, method, device, resolution, resolution // vae_scale, n_instance,
                                   n_class, instance_masks, autocast)
    for regularizer in regularizers:
        warnings += regularizer.prepare(reg_inputs)

    # 6. Resume from the checkpoint a previous (interrupted) call left, if any.
    fingerprint = run_fingerprint(config, all_examples, n_instance,
                                  (instance_masks if "mask" in config.regularizers or method.uses_masks else [])
                                  + (negative_masks or []),
                                  parent_embedding)
    state = TrainingState(params, optimizer, lr_scheduler, scaler, generator)
    losses: list[float] = []
    start_step = 0
    if checkpoint_dir is not None and (checkpoint_dir / CHECKPOINT_FILE).exists():
        start_step, losses = state.load(checkpoint_dir / CHECKPOINT_FILE, fingerprint)
    resumed_from = start_step

    def checkpoint(step: int) -> None:
        if checkpoint_dir is not None:
            state.save(checkpoint_dir / CHECKPOINT_FILE, fingerprint, step, losses)

    def validate(step: int) -> None:
        if on_validation is not None and config.validation_every:
            on_validation(step, _validation_images(components, config, resolution, device, autocast))

    stopped = False
    interrupter = _StepInterrupter(components.unet, should_stop) if should_stop is not None else None
    for step in range(start_step + 1, config.steps + 1):
        if should_stop is not None and should_stop():
            stopped = True
            if step - 1 > resumed_from:
                checkpoint(step - 1)
            break
        step_started = time.perf_counter()
        # Pick this step's instance images (and as many class images), in seeded order.
        batch = torch.randint(0, n_instance, (config.batch_size,), generator=generator)
        if n_class:
            batch = torch.cat([batch, n_instance + torch.randint(0, n_class, (config.batch_size,), generator=generator)])
        batch = batch.to(device)
        # Sample latents from the cached distributions.
        eps = torch.randn(latent_mean[batch].shape, generator=generator, dtype=torch.float32).to(device)
        latents = (latent_mean[batch] + latent_std[batch] * eps) * scaling
        # Sample noise and a timestep per image, and noise the latents (forward diffusion).
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        # Forward and backward can take minutes at a large resolution: the UNet's blocks ask should_stop as they
        # run (_StepInterrupter), and a stop abandons the step; the weights stay those of the step before.
        try:
            if interrupter is not None:
                interrupter.armed = True
            with autocast():
                # Condition on the captions: cached, or encoded now so gradients reach the text encoder.
                text = cached_text[batch] if cached_text is not None else components.text_encoder(input_ids[batch])[0]
                method.before_unet(batch, noisy, timesteps, text)
                # Predict the noise (or velocity) the scheduler's config asks for.
                pred = components.unet(noisy, timesteps, text).sample
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
            # MSE per image (latent pixels weighted where a regulariser asks, e.g. by the subject mask), min-SNR
            # weighted when asked; instance and prior halves averaged separately.
            weights = None
            for regularizer in regularizers:
                extra = regularizer.pixel_weights(batch)
                if extra is not None:
                    weights = extra if weights is None else weights * extra
            squared = F.mse_loss(pred.float(), target.float(), reduction="none")
            per_image = weighted_pixel_mean(squared, weights)
            if config.min_snr_gamma is not None:
                per_image = per_image * _min_snr_weights(compute_snr(noise_scheduler, timesteps), config.min_snr_gamma,
                                                         prediction_type)
            instance_loss = per_image[:config.batch_size].mean()
            terms = {"instance": instance_loss}
            loss = instance_loss
            if n_class:
                terms["prior"] = per_image[config.batch_size:].mean()
                loss = instance_loss + config.prior_loss_weight * terms["prior"]
            step_inputs = {"noisy": noisy.detach(), "timesteps": timesteps, "step": step}
            extra_terms = [method.loss_terms()] + [r.loss_terms(batch, step_inputs) for r in regularizers]
            for extra in extra_terms:
                for name, (value, weight) in extra.items():
                    terms[name] = value
                    loss = loss + weight * value
            terms["loss"] = loss
            # One device-to-host copy for every term: each .item() would be a GPU sync of its own.
            step_losses = dict(zip(terms, torch.stack([t.detach() for t in terms.values()]).tolist()))
            # Backward, clip, optimiser and schedule step; then let the method fix what must not move.
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
        except _StepInterrupted:
            optimizer.zero_grad(set_to_none=True)
            stopped = True
            if step - 1 > resumed_from:
                checkpoint(step - 1)
            break
        finally:
            if interrupter is not None:
                interrupter.armed = False  # validation images and the rest between steps run uninterrupted
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        for regularizer in regularizers:
            regularizer.after_optimizer_step(step)
        # Report.
        losses.append(step_losses["loss"])
        if on_step is not None:
            on_step(step, step_losses, 1.0 / max(time.perf_counter() - step_started, 1e-9))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            checkpoint(step)
        if config.validation_every and step % config.validation_every == 0 and step < config.steps:
            validate(step)

    if interrupter is not None:
        interrupter.remove()

    # 7. Final validation images, then save in the method's ecosystem format.
    if not stopped and len(losses) == config.steps and config.steps > resumed_from:
        validate(config.steps)
    components.unet.eval()
    components.text_encoder.eval()
    if dtype is not None and device.type == "cuda" or trained_dtype != torch.float32:  # saved files are fp32
        for model in (components.text_encoder, components.vae, components.unet):
            model.to(dtype=torch.float32)
    with loading_models():  # a method may load the base's other components to save a whole pipeline
        artifact = method.save(output_dir)
    if parent_embedding is not None and not method.saves_pipeline:
        from safetensors.torch import save_file

        token, embedding = parent_embedding
        save_file({token: embedding.detach().float().cpu().contiguous()}, str(Path(output_dir) / LEARNED_EMBEDS))
    return TrainResult(method=config.method, output_dir=output_dir, artifact=artifact, steps=len(losses),
                       stopped=stopped, losses=tuple(losses), seconds=time.perf_counter() - started,
                       warnings=tuple(warnings), resumed_from=resumed_from, components=components)


class _StepInterrupted(Exception):
    """should_stop() said yes in the middle of a step."""


class _StepInterrupter:
    """Asks `should_stop` before each UNet block, attention and resnet runs forward and as its gradient comes back
    in backward, and raises _StepInterrupted when it says yes, so a stop does not wait for a long step to end.
    `should_stop` is called a few hundred times a step: a costly one should throttle itself."""

    # What is asked about besides the up/down/mid blocks: the units a block's time goes to.
    UNITS = ("Attention", "ResnetBlock2D", "Transformer2DModel")

    def __init__(self, unet, should_stop: ShouldStop):
        self.should_stop = should_stop
        # Only while the loop runs a step's forward and backward.
        self.armed = False
        units = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        units += [m for m in unet.modules() if type(m).__name__ in self.UNITS]
        self.handles = [unit.register_forward_pre_hook(self._before) for unit in units if unit is not None]
        self.handles += [unit.register_forward_hook(self._after) for unit in units if unit is not None]

    def check(self, *_) -> None:
        if self.armed and self.should_stop():
            raise _StepInterrupted()

    def _before(self, module, args) -> None:
        self.check()

    def _after(self, module, args, output) -> None:
        first = output[0] if isinstance(output, (tuple, list)) else output
        if getattr(first, "requires_grad", False):
            first.register_hook(self.check)  # runs when this block's gradient is computed in backward

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _min_snr_weights(snr, gamma: float, prediction_type: str):
    """Hang et al. 2023: weight = min(snr, gamma) / snr for epsilon targets, / (snr + 1) for v-prediction."""
    import torch

    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1 if prediction_type == "v_prediction" else snr)


def _autocast(device, mixed_precision: str, warnings: list[str]):
    """An autocast context for `mixed_precision` where `device` supports it, else fp32 with a warning."""
    import torch

    if mixed_precision == "no":
        return contextlib.nullcontext, None
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    supported = (device.type == "cuda" and (dtype == torch.float16 or torch.cuda.is_bf16_supported())) \
        or (device.type == "cpu" and dtype == torch.bfloat16)
    if not supported:
        warnings.append(f"`mixed_precision` {mixed_precision} is not supported on {device.type}: training in fp32")
        return contextlib.nullcontext, None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), dtype


def _trained_dtype(device, name: str, warnings: list[str]):
    """The torch dtype of the trained weights: bf16 where asked and `device` computes in it, else fp32."""
    import torch

    if name == "bf16":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        warnings.append(f"`trained_dtype` bf16 is not supported on {device.type}: keeping the trained weights in fp32")
    return torch.float32


def _validation_images(components: Components, config: TrainConfig, resolution: int, device, autocast) -> list:
    """Draws one image per validation prompt with the weights as they are now (DDIM, guidance 7.5, fixed seed).

    Uses its own seeded generator, so drawing validation images never changes the training run.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was_training = components.unet.training, components.text_encoder.training
    components.unet.eval()
    components.text_encoder.eval()
    images = []
    try:
        with torch.no_grad(), autocast():
            for prompt in config.validation_prompts:
                generator = torch.Generator(device="cpu").manual_seed(config.seed)
                image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=config.validation_steps,
                             generator=generator).images[0]
                images.append((prompt, image))
    finally:
        components.unet.train(was_training[0])
        components.text_encoder.train(was_training[1])
    return images

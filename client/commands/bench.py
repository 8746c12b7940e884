"""`persona-cli bench train|generate|flow`: persona beside the reference implementations on this machine —
training loop vs the diffusers example loop, sampling (Triton, in-process) vs diffusers' pipeline, and the whole
photos → concept path."""
from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..output import note, quiet_libraries, table
from .session import JsonOption, session
from .train import STAGES

app = typer.Typer(help="Measure persona's speed against reference implementations, on this machine.",
                  no_args_is_help=True, rich_markup_mode="markdown")


@app.callback()
def bench() -> None:
    """Measure persona's speed against reference implementations, on this machine."""


class BenchMethod(str, Enum):
    lora = "lora"
    dreambooth = "dreambooth"
    ti = "ti"
    custom_diffusion = "custom_diffusion"
    svdiff = "svdiff"


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command("train")
def train(
    ctx: typer.Context,
    base_model: Annotated[str, typer.Option(
        metavar="tiny|sd15|sd21-base|PATH",
        help="`tiny` (the built-in 64 px random model, seconds on a CPU); `sd15` or `sd21-base` (real-size "
             "random weights built once from the configs under --config-root into the model cache); or a local "
             "diffusers folder.")] = "tiny",
    method: Annotated[Optional[list[BenchMethod]], typer.Option(
        "--method", show_default="lora and dreambooth",
        help="Method to time; repeat for several. lora: rank-4 adapters on to_q/to_k/to_v/to_out.0 "
             "(train_dreambooth_lora.py); dreambooth: the whole UNet (train_dreambooth.py); ti, custom_diffusion, "
             "svdiff: our loop only (no diffusers DreamBooth counterpart), ratio vs our lora when it runs too.")]
    = None,
    steps: Annotated[int, typer.Option(min=1, help="Steps timed per run, after the warmup.")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed steps first (allocator, kernels, caches).")] = 3,
    resolution: Annotated[Optional[int], typer.Option(
        min=8, show_default="the model's native one", help="Training image side in pixels, a multiple of 8.")] = None,
    device: Annotated[Optional[str], typer.Option(
        metavar="cpu|cuda|cuda:N", show_default="cuda when available, else cpu",
        help="Where both loops run.")] = None,
    mixed_precision: Annotated[Precision, typer.Option(
        help="On CUDA: autocast in fp16/bf16, and the reference loop keeps its frozen weights in that type as the "
             "diffusers examples do. Ignored on CPU (both loops fp32).")] = Precision.no,
    images: Annotated[Optional[Path], typer.Option(
        file_okay=False, exists=True, show_default="random-noise images",
        help="Folder of photos (jpg/png/webp) to train on; the first --num-images, sorted by name.")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Instance images (and as many noise class images).")] = 4,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Photos per step in both loops, each with a class image (the examples' --train_batch_size; "
                    "`persona-cli train --batch-size`); at most --num-images. A step does that many times the work: "
                    "compare it/s at equal batch sizes.")] = 1,
    config_root: Annotated[Optional[Path], typer.Option(
        file_okay=False, envvar="PERSONA_MODEL_CONFIGS", show_default="../shared/models/configs",
        help="Folder holding sd15/ and sd21-base/ diffusers configs, for --base-model sd15|sd21-base.")] = None,
    regularizer: Annotated[Optional[list[str]], typer.Option(
        "--reg", show_default="none",
        help="Also time our LoRA loop with this regulariser (mask, spl, core; repeat): its row's ratio is its it/s "
             "over plain LoRA's, what the regulariser costs.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time persona's training loop against the diffusers DreamBooth example loop, in one process on one device.

    The reference is the inner loop of diffusers `examples/dreambooth/train_dreambooth_lora.py` and
    `train_dreambooth.py` with prior preservation (1 instance + 1 class image a step): every step it
    preprocesses and tokenizes the batch, VAE-encodes the images, text-encodes the prompts, noises, runs the UNet,
    takes MSE + prior loss, backward, clips, steps AdamW and the LR schedule. persona's loop encodes images and
    prompts once and reuses them. Both train the same images from the same seed, with the examples' settings.

    Prints it/s over the timed steps (and from the median step, steadier on a busy machine), peak GPU memory
    and ours / reference. Runs locally; --server is not used.

    Example: `persona-cli bench train --base-model sd15 --device cuda --mixed-precision fp16 --steps 50`
    """
    from persona.bench.models import bench_base_model, describe_device, model_cache, native_resolution, torch_device
    from persona.bench.train import BENCH_METHODS, run_train_benchmark

    s = session(ctx)
    quiet_libraries()
    cache = model_cache(s.data_dir)
    methods = [m.value for m in method] if method else list(BENCH_METHODS)
    methods = list(dict.fromkeys(methods))
    dev = torch_device(device)
    precision = mixed_precision.value if dev.type == "cuda" else "no"
    if mixed_precision.value != precision:
        note(f"--mixed-precision {mixed_precision.value} applies on CUDA only: both loops train in fp32 on {dev}")
    note(f"preparing base model {base_model}")
    folder = bench_base_model(base_model, cache, config_root)
    size = resolution or native_resolution(folder)
    rows = run_train_benchmark(folder, methods=methods, steps=steps, warmup_steps=warmup, resolution=size,
                               device=str(dev), mixed_precision=precision, num_images=num_images,
                               images_dir=images, regularizers=regularizer or (), batch_size=batch_size,
                               on_run=lambda m, loop: note(f"{m}: {loop} loop, {warmup} + {steps} steps"))
    name = describe_device(dev)
    data = {"device": name, "base_model": base_model, "base_model_dir": str(folder), "resolution": size,
            "steps": steps, "warmup_steps": warmup, "mixed_precision": precision, "batch_size": batch_size,
            "images": str(images) if images else "noise", "rows": [asdict(r) for r in rows]}

    def render() -> str:
        header = (f"device {name}; base model {base_model}; {size} px; {steps} steps timed after {warmup}; "
                  f"batch {batch_size} + {batch_size} class; mixed precision {precision}; "
                  "reference: diffusers DreamBooth example loop"
                  + ("; lora+REG rows: vs plain lora (ours)" if regularizer else "")
                  + ("; ti/custom_diffusion/svdiff rows: ours only, vs plain lora (ours)"
                     if set(methods) - set(BENCH_METHODS) else ""))
        body = table(
            ["METHOD", "LOOP", "IT/S", "IT/S (MEDIAN STEP)", "PEAK GPU MEM", "VS REFERENCE"],
            [(r.method, r.loop, f"{r.it_per_s:.2f}", f"{r.median_it_per_s:.2f}", _gib(r.peak_gpu_mem_bytes),
              f"{r.vs_reference:.2f}x" if r.vs_reference is not None else "n/a") for r in rows])
        return header + "\n" + body

    s.output(as_json).emit(data, render)


def _gib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**30:.2f} GiB"


@app.command("flow")
def flow(
    ctx: typer.Context,
    photos: Annotated[Path, typer.Argument(file_okay=False, exists=True, show_default=False,
                                           help="Folder of the subject's photos (jpg/png/webp).")],
    class_name: Annotated[str, typer.Option("--class", help="The subject's class noun.")] = "dog",
    base_model: Annotated[str, typer.Option(metavar="ID|PATH|tiny",
                                            help="Base model to train on (as `persona-cli train`).")] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="LoRA steps (the issue's target: 1000 in ≤ 3 min on one H100).")]
    = 1000,
    resolution: Annotated[Optional[int], typer.Option(min=8, show_default="the base model's native one",
                                                      help="Training image side in pixels.")] = None,
    num_class_images: Annotated[int, typer.Option(min=1, help="Prior-preservation class images (drawn once per "
                                                  "base model and reused by later runs).")] = 100,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, show_default="train's: the photos, up to 4 (1 on tiny)",
        help="Photos per training step, each with a class image (`persona-cli train --batch-size`).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time the whole path from photos to a usable concept: upload → captions → LoRA training (prior
    preservation on) → LoRA export, through the same gRPC services a user calls.

    Captions are SID Case 3 when a VLM is configured (PERSONA_VLM_*), else the Case 1 template. Embedded by
    default; with --server it times that deployment (its own GPU). Prints each stage's seconds and the total.

    Example: `persona-cli bench flow ./photos --class dog --base-model stable-diffusion-v1-5/stable-diffusion-v1-5`
    """
    import time

    from persona.bench.flow import caption_case
    from persona.v1 import caption_pb2, common_pb2, subjects_pb2, train_pb2, train_pb2_grpc

    s = session(ctx)
    quiet_libraries()
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        from ..output import fail
        fail("INVALID_ARGUMENT", f"{photos} holds no jpg/png/webp photos")
    client = s.client()
    trainer = train_pb2_grpc.TrainServiceStub(client.channel_for("train"))
    seconds: dict[str, float] = {}

    def timed(stage: str, work):
        note(f"{stage} …")
        started = time.perf_counter()
        result = work()
        seconds[stage] = time.perf_counter() - started
        return result

    def finished(job: common_pb2.Job) -> common_pb2.Job:
        final = client.wait_for_job(job.job_id)
        if final.state != common_pb2.JOB_STATE_SUCCEEDED:
            from ..output import fail
            fail(final.error.code or "ABORTED", final.error.message or f"job {job.job_id} ended {final.state}")
        return final

    subject = timed("upload", lambda: client.subjects.CreateSubject(subjects_pb2.CreateSubjectRequest(
        class_name=class_name, images=[subjects_pb2.ImageUpload(data=p.read_bytes(), filename=p.name)
                                       for p in files])))
    case = caption_case(remote=bool(s.server))
    timed("captions", lambda: finished(client.captions.StartCaptioning(caption_pb2.StartCaptioningRequest(
        subject_id=subject.subject_id, case=case))))
    options = train_pb2.TrainingOptions(steps=steps, num_class_images=num_class_images,
                                        **({"resolution": resolution} if resolution else {}),
                                        **({"batch_size": batch_size} if batch_size else {}))
    job = timed("train", lambda: finished(trainer.StartTraining(train_pb2.StartTrainingRequest(
        subject_id=subject.subject_id, base_model=base_model, method="lora", options=options))))
    concept_id = job.params["concept_id"]
    batch_size = trainer.GetConcept(train_pb2.GetConceptRequest(concept_id=concept_id)).options.batch_size  # as run
    timed("export", lambda: trainer.ExportConcept(train_pb2.ExportConceptRequest(
        concept_id=concept_id, format=train_pb2.EXPORT_FORMAT_LORA)))
    total = sum(seconds.values())
    # Where the train job's time went, as the server measured it (class images, training, saving, …).
    reported = dict(job.train_result.stage_seconds)
    train_stages = {stage: reported[stage] for stage in (*STAGES, *reported) if stage in reported}  # in run order
    data = {"base_model": base_model, "steps": steps, "batch_size": batch_size, "photos": len(files),
            "caption_case": case,
            "concept_id": concept_id, "seconds": seconds, "total_seconds": total,
            "train_it_per_s": steps / seconds["train"], "train_stage_seconds": train_stages}

    def render() -> str:
        rows = []
        for stage, value in seconds.items():
            rows.append((stage, f"{value:.1f}"))
            if stage == "train":
                rows += [(f"  {name}", f"{part:.1f}") for name, part in train_stages.items()]
        rows.append(("total", f"{total:.1f}"))
        return (f"{len(files)} photos, captions case {case}, {steps} LoRA steps of {batch_size} photo(s) "
                f"on {base_model} "
                f"({steps / seconds['train']:.2f} steps/s including model loading and class images)\n"
                + table(["STAGE", "SECONDS"], rows))

    s.output(as_json).emit(data, render)


class SamplingPath(str, Enum):
    triton = "triton"
    embedded = "embedded"
    embedded_compile = "embedded-compile"
    diffusers = "diffusers"
    diffusers_compile = "diffusers-compile"


# torch.compile of even the tiny UNet took 439 s on this project's 2-core CPU machines: compile rows are opt-in there.
CPU_COMPILE_NOTE = ("diffusers-compile and embedded-compile are not timed on CPU by default: torch.compile of even "
                    "the tiny UNet takes minutes there (439 s measured on 2 cores); pass --path to time them")


@app.command("generate")
def generate(
    ctx: typer.Context,
    base_model: Annotated[str, typer.Option(
        metavar="tiny|sd15|sd21-base|PATH",
        help="`tiny` (the built-in 64 px random model); `sd15` or `sd21-base` (real-size random weights built once "
             "from the configs under --config-root: the same compute as trained weights); or a local diffusers "
             "folder.")] = "tiny",
    path: Annotated[Optional[list[SamplingPath]], typer.Option(
        "--path", show_default="triton, embedded, diffusers (+ diffusers-compile on CUDA)",
        help="What to time; repeat for several. triton: persona's Triton path (a tritonserver started here, the "
             "model in its repository, one request per batch); embedded: persona's in-process engine (fp16 and one "
             "CUDA graph per shape on CUDA); embedded-compile: the same with torch.compile of the UNet under the "
             "graph; diffusers: StableDiffusionPipeline (fp16 + SDPA on CUDA); diffusers-compile: the same with "
             "torch.compile(unet, mode=reduce-overhead).")] = None,
    batch: Annotated[Optional[list[int]], typer.Option(
        "--batch", min=1, show_default="1 and 4", help="Images per call; repeat for several.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 50,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 7.5,
    resolution: Annotated[Optional[int], typer.Option(
        min=8, show_default="the model's native one", help="Image side in pixels, a multiple of 8.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per path and batch (the median counts).")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls first (loading, kernels, CUDA graphs).")] = 1,
    device: Annotated[Optional[str], typer.Option(
        metavar="cpu|cuda|cuda:N", show_default="cuda when available, else cpu", help="Where every path runs.")]
    = None,
    config_root: Annotated[Optional[Path], typer.Option(
        file_okay=False, envvar="PERSONA_MODEL_CONFIGS", show_default="../shared/models/configs",
        help="Folder holding sd15/ and sd21-base/ diffusers configs, for --base-model sd15|sd21-base.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Time sampling through persona's Triton path and in-process engine beside diffusers' StableDiffusionPipeline
    (and + torch.compile), in one run on one device; plus start and hot-load times.

    Same prompts, seeds, DDIM steps, guidance and size everywhere. Prints seconds per image (median of
    --repeats calls), peak GPU memory and each row's speed-up over diffusers and over diffusers + compile for each
    batch size; then, per persona path, seconds to the first image in a fresh process (first start, and cached
    start on what the first left) and to hot-load a second concept of the same base (its own UNet; the base's text
    encoder and VAE shared). Runs locally; --server is not used.

    Example: `persona-cli bench generate --base-model sd15 --device cuda --batch 1 --batch 8 --json`
    """
    from dataclasses import asdict

    from persona.bench.generate import run_sampling_benchmark
    from persona.bench.models import bench_base_model, model_cache, native_resolution, torch_device

    s = session(ctx)
    quiet_libraries()
    cache = model_cache(s.data_dir)
    dev = torch_device(device)
    paths = [p.value for p in path] if path else (
        ["triton", "embedded", "diffusers"] + (["diffusers-compile"] if dev.type == "cuda" else []))
    notes = [] if path or dev.type == "cuda" else [CPU_COMPILE_NOTE]
    batches = list(dict.fromkeys(batch or [1, 4]))
    note(f"preparing base model {base_model}")
    folder = bench_base_model(base_model, cache, config_root)
    size = resolution or native_resolution(folder)
    result = run_sampling_benchmark(folder, device=dev, paths=list(dict.fromkeys(paths)), batch_sizes=batches,
                                    steps=steps, guidance_scale=guidance, resolution=size, repeats=repeats,
                                    warmup=warmup, on_stage=lambda stage: note(stage))
    data = {"device": result.device, "base_model": base_model, "base_model_dir": str(folder), "resolution": size,
            "steps": steps, "guidance_scale": guidance, "scheduler": "ddim", "repeats": repeats, "warmup": warmup,
            "rows": [asdict(r) for r in result.rows], "starts": [asdict(r) for r in result.starts],
            "triton_first_load_seconds": result.first_load_seconds,
            "triton_hot_load_seconds": result.hot_load_seconds, "triton_components": result.triton_components,
            "notes": notes}

    def render() -> str:
        header = (f"device {result.device}; base model {base_model}; {size}x{size}; {steps} DDIM steps, CFG "
                  f"{guidance:g}; median of {repeats} after {warmup} warmup")
        body = table(["PATH", "BATCH", "S/IMAGE", "PEAK GPU MEM", "DIFFUSERS ÷ PATH", "DIFFUSERS+COMPILE ÷ PATH"],
                     [(r.path, r.batch, f"{r.seconds_per_image:.3f}",
                       _gib(r.peak_gpu_mem_bytes) + (" (device)" if r.memory_scope == "device" and
                                                     r.peak_gpu_mem_bytes is not None else ""),
                       _ratio(r.speedup_vs_diffusers), _ratio(r.speedup_vs_diffusers_compile))
                      for r in result.rows])
        lines = [header, body]
        starts = [(r.path, _seconds(r.first_start_seconds), _seconds(r.cached_start_seconds),
                   _seconds(r.hot_load_seconds), "n/a" if r.recaptured is None else ("yes" if r.recaptured else "no"))
                  for r in result.starts]
        if result.hot_load_seconds is not None:
            starts.append((f"triton ({result.triton_components} components)", _seconds(result.first_load_seconds)
                           + " (load)", "n/a", _seconds(result.hot_load_seconds), "n/a"))
        if starts:
            lines.append(table(["PATH", "FIRST START", "CACHED START", "HOT-LOAD", "RECAPTURED"], starts))
        lines += notes
        return "\n".join(lines)

    s.output(as_json).emit(data, render)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


@app.command("quality")
def quality(
    ctx: typer.Context,
    reference_sets: Annotated[Optional[list[Path]], typer.Argument(
        metavar="REFERENCE_SET…", show_default="the three shared sets (../shared/toyworld/references/*)",
        help="Toy-world reference sets: folders of photos with a scene.json (subject, background, nearby object, "
             "class, and per photo its case1/case3/full captions).")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        metavar="PATH|ID", show_default="the shared toy base (../shared/toyworld/base, or $PERSONA_TOYWORLD/base)",
        help="Base model every configuration trains on; its pictures must mean something (the toy base).")] = None,
    config: Annotated[Optional[list[str]], typer.Option(
        "--config", show_default="case1, case1+prior, sid, sid+prior",
        help="Configuration to train; repeat for several. case1 (\"a photo of a sks ring\") or sid (the Case 3 "
             "captions), joined by '+' with regularisers: prior, mask (the subject clicked at the centre of its "
             "colours: needs the mask service's CLIP model), core, spl (these two train the text encoder).")] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", show_default="lora", help="lora or dreambooth; repeat for both (each config runs per method).")]
    = None,
    encoder: Annotated[Optional[list[str]], typer.Option(
        "--encoder", metavar="ENCODER",
        help="A CustomContrast encoder (`persona-cli encoder list`): one more row whose concepts it makes from the "
             "photos with no fine-tuning (class captions; --config, --method and training options do not apply to "
             "it); repeat to compare encoders, e.g. one trained with --no-cscl --no-macl, the ratios then over the "
             "first. With --encoder alone only encoder rows run.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0…N-1: each trains its own concept and draws its own "
                                                   "images; the spread is over them.")] = 3,
    first_seed: Annotated[int, typer.Option(min=0, help="Start the seeds here (S…S+N-1): more seeds in a second "
                                                        "run, or two runs side by side.")] = 0,
    images: Annotated[int, typer.Option("-n", "--images", min=1, max=16, help="Images per prompt and seed.")] = 8,
    prompts: Annotated[int, typer.Option(min=1, max=2, help="Prompts of each kind (background unsaid with a new "
                                                            "nearby object; a new plain background asked).")] = 2,
    steps: Annotated[Optional[int], typer.Option(help="Training steps.", show_default="the train service's")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.", show_default="the method's")] = None,
    num_class_images: Annotated[Optional[int], typer.Option(help="Class images for prior preservation.",
                                                            show_default="the train service's")] = None,
    class_image_steps: Annotated[Optional[int], typer.Option(help="Sampling steps of each class image.",
                                                             show_default="the train service's")] = None,
    prior_weight: Annotated[Optional[float], typer.Option(help="Weight of the prior-preservation loss.",
                                                          show_default="the train service's")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Any other TrainingOptions field, e.g. --set lora_rank=8 "
                                           "--set lora_targets=to_k,to_v; repeat for several.")] = None,
    report: Annotated[Optional[Path], typer.Option(
        "--report", dir_okay=False, help="Write an HTML report (image grids of the first seed, metric table) here, "
                                         "and its JSON beside it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure what each training configuration does to entanglement, on the toy world (../shared/toyworld).

    For every reference set, configuration and seed, a concept trains through the services (subjects uploaded,
    captions stored with SetCaption), then draws on prompts that leave the background unsaid ("a photo of a sks
    ring next to a small purple circle") and ask for a new plain one ("… on a plain cyan background"), in colours
    none of the photos has. Each image's pixels are mapped to the world's ten colours and counted. Prints per
    configuration, averaged over the sets, as mean ± standard deviation over seeds:

    - nearby: fraction of pixels in the photos' nearby object's colour (lower is better);
    - background: fraction of the outer 5-px frame in the photos' background colours, background unsaid (lower);
    - asked bg: fraction of asked-background images where that colour covers ≥ 40 % (text alignment, higher);
    - subject: fraction of images where the subject's colours cover ≥ 3 % (fidelity, higher);
    - nearby obj: nearby, counting only object-sized regions of that colour (each ≤ 6 % of the image: a subject or
      background drawn in it is not the object leaking), and 0 in an image whose frame is ≥ 25 % that colour;
    - ÷ case1: nearby and background leakage over the Case 1 row's (same method and prior setting); an encoder
      row's (--encoder) over the first encoder's.

    Example: `persona-cli bench quality ../shared/toyworld/references/red-ring --config case1+prior --config
    sid+prior --seeds 3 --report quality.html`
    """
    import json

    from persona.bench.quality import (DEFAULT_CONFIGS, METRICS, Configuration, QualityBenchmark, default_toyworld,
                                       quality_report_html, read_reference_set, training_option_pairs)

    from ..output import fail

    s = session(ctx)
    quiet_libraries()
    world = default_toyworld()
    folders = reference_sets or sorted(p for p in (world / "references").glob("*") if p.is_dir())
    if not folders:
        fail("INVALID_ARGUMENT", f"`REFERENCE_SET` not given and {world / 'references'} holds none: pass toy-world "
                                 "reference folders, or set PERSONA_TOYWORLD to the shared toy world")
    references = [read_reference_set(f) for f in folders]  # a bad folder: INVALID_ARGUMENT, naming it
    base = base_model or str(world / "base")
    try:
        configs = [] if encoder and not (config or method) else [
            Configuration.parse(c, m) for m in dict.fromkeys(method or ["lora"])
            for c in dict.fromkeys(config or DEFAULT_CONFIGS)]
    except ValueError as e:
        fail("INVALID_ARGUMENT", str(e))
    configs += [Configuration.from_encoder(e) for e in dict.fromkeys(encoder or [])]
    given = {"steps": steps, "learning_rate": lr, "num_class_images": num_class_images,
             "class_image_steps": class_image_steps, "prior_loss_weight": prior_weight}
    options = {k: v for k, v in given.items() if v is not None}
    options.update(training_option_pairs(option or []))
    bench = QualityBenchmark(s.client(), base, images_per_prompt=images, prompts_per_kind=prompts, options=options,
                             on_stage=note)
    rows = bench.run(references, configs, list(range(first_seed, first_seed + seeds)))
    data = {"base_model": base, "reference_sets": [str(r.folder) for r in references], "seeds": seeds,
            "first_seed": first_seed, "images_per_prompt": images, "options": options,
            "rows": [{"config": r.config.name, "method": r.config.method, "captions": r.config.captions,
                      "regularizers": list(r.config.regularizers), **({"encoder": r.config.encoder}
                                                                      if r.config.encoder else {}),
                      "metrics": {m: {"mean": r.mean(m), "std": r.std(m), "per_seed": r.per_seed[m]}
                                  for m in METRICS if m in r.per_seed},
                      "per_reference": r.per_reference, "baseline": r.baseline, "ratio_to_case1": r.ratios}
                     for r in rows]}
    if report is not None:
        report.write_text(quality_report_html(rows, base=base, references=references, seeds=seeds,
                                              images_per_prompt=images, options=options))
        report.with_suffix(".json").write_text(json.dumps(data, indent=2))
        note(f"report: {report} (and {report.with_suffix('.json')})")

    def cell(r, metric: str) -> str:
        mean, std = r.mean(metric), r.std(metric)
        return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"

    def ratio(r, metric: str) -> str:
        return f"{r.ratios[metric]:.2f}x" if metric in r.ratios else "n/a"

    def render() -> str:
        header = (f"base model {base}; sets {', '.join(r.name for r in references)}; seeds {seeds}; "
                  f"{images} images per prompt; options {options or 'the train service defaults'}")
        body = table(["CONFIG", "NEARBY", "BACKGROUND", "ASKED BG", "SUBJECT", "NEARBY ÷ CASE1", "BG ÷ CASE1",
                      "NEARBY OBJ", "OBJ ÷ CASE1"],
                     [(r.config.name, cell(r, "nearby_leakage"), cell(r, "background_leakage"),
                       cell(r, "text_alignment"), cell(r, "subject_fidelity"), ratio(r, "nearby_leakage"),
                       ratio(r, "background_leakage"), cell(r, "nearby_object_leakage"),
                       ratio(r, "nearby_object_leakage")) for r in rows])
        return header + "\n" + body

    s.output(as_json).emit(data, render)


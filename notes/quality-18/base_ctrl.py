import sys, torch, numpy as np
from diffusers import StableDiffusionPipeline, DDIMScheduler
from persona.services.evaluate import toyworld as tw
from PIL import Image
base = "/work/wt/shared/toyworld/base"
pipe = StableDiffusionPipeline.from_pretrained(base, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
for name in sys.argv[1:]:
    ref = tw.read_reference_set(f"/work/wt/shared/toyworld/references/{name}")
    prompts = tw.bench_prompts(ref, 2)
    scores, ims = [], []
    for k, p in enumerate(prompts):
        n = 8
        gens = [torch.Generator().manual_seed(k * n + j) for j in range(n)]
        out = pipe([p.text] * n, height=64, width=64, num_inference_steps=30, guidance_scale=6.0, generator=gens).images
        for im in out:
            scores.append(tw.score_image(im, p, ref)); ims.append(im)
    print(name, {k: round(v, 4) for k, v in tw.summarise(scores).items()}, flush=True)
    W = Image.new("RGB", (64 * 8, 64 * 4))
    for i, im in enumerate(ims): W.paste(im, ((i % 8) * 64, (i // 8) * 64))
    W.save(f"/tmp/q18/base_{name}.png")

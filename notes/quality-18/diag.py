"""Draw the training caption from a trained DreamBooth concept folder and score subject colours."""
import sys, torch, numpy as np
from pathlib import Path
from diffusers import StableDiffusionPipeline, DDIMScheduler
from persona.services.evaluate import toyworld as tw
from PIL import Image
ref = tw.read_reference_set("/work/wt/shared/toyworld/references/red-ring")
out = Image.new("RGB", (64 * 8, 64 * len(sys.argv[1:]) * 2))
for row, folder in enumerate(sys.argv[1:]):
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for k, prompt in enumerate(["a photo of a sks ring", "a photo of a sks ring on a striped green and yellow background next to a small blue square"]):
        ims = pipe([prompt] * 8, height=64, width=64, num_inference_steps=30, guidance_scale=6.0,
                   generator=[torch.Generator().manual_seed(j) for j in range(8)]).images
        labs = [tw.palette_labels(im) for im in ims]
        print(folder[-30:], prompt[:40], "red", round(np.mean([tw.colour_fraction(l, ["red"]) for l in labs]), 3),
              "subject shown", np.mean([tw.subject_shown(l, ref) for l in labs]),
              "nearby", round(np.mean([tw.nearby_leakage(l, ref) for l in labs]), 3), flush=True)
        for j, im in enumerate(ims): out.paste(im, (j * 64, (row * 2 + k) * 64))
out.save("/tmp/q18/diag.png")

"""Train service: fine-tunes a base text-to-image model on a subject's photos (DreamBooth, LoRA, ...)."""

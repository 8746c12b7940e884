"""Triton python-backend model: a persona Stable Diffusion pipeline (prompts → images) over its component
models, called through BLS. The code lives in persona.services.generate.triton_models."""
from persona.services.generate.triton_models import StableDiffusionPipelineModel as TritonPythonModel  # noqa: F401

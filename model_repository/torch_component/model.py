"""Triton python-backend model: one component of a Stable Diffusion model (text encoder, UNet or VAE decoder)
under torch, from its diffusers weights. The code lives in persona.services.generate.triton_models."""
from persona.services.generate.triton_models import TorchComponent as TritonPythonModel  # noqa: F401

"""Triton python-backend model: one ONNX graph of a Stable Diffusion model (text encoder, UNet or VAE decoder)
under ONNX Runtime. The code lives in persona.services.generate.triton_models."""
from persona.services.generate.triton_models import OnnxRuntimeComponent as TritonPythonModel  # noqa: F401

"""GenerateService: samples images from concepts (in-process engine, or Triton)."""

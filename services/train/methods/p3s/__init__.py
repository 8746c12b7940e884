"""P3S-Diffusion (point-supervised selective subject-driven generation, §III) as a training method: the negative-
region fill (fill.py, Eq. 3), the attention-consistency loss (consistency.py, Eq. 11–13, 15), the hyper-parameters
(config.py) and the method (method.py). The condition side it trains — RNGR encoder, the UNet copy and its
injection, the timestep weights — is in services/models/p3s/. Each module's docstring says the reading of the
paper it chose."""

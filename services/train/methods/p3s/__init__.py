"""P3S-Diffusion (Hu et al., "Point-supervised selective subject-driven generation", §III) as pieces of a training
method: negative-region fill (fill.py, Eq. 3), RNGR encoder (rngr.py, Eq. 4–5), multi-layer condition injection
(injection.py, Eq. 6–8), timestep weight scheduler (weights.py, Eq. 9–10), attention-consistency loss
(consistency.py, Eq. 11–13, 15). Each module's docstring says the reading of the paper it chose.

These modules import torch at the top: only the p3s method imports them, inside `prepare`, so importing
`services.train.methods` stays light."""

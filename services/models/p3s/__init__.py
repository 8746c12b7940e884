"""P3S-Diffusion's condition side (§III): the RNGR encoder (rngr.py, Eq. 4–5), the simplified trainable UNet copy
and the self-attention it injects into (injection.py, Eq. 6–8) and the timestep weights (weights.py, Eq. 9–10) —
what a P3S concept is trained and drawn with, so train and generate both read it from here. The training-only
pieces (fill, consistency loss, the method) are in services/train/methods/p3s/.

rngr.py and injection.py import torch at the top: only code that trains or draws a P3S concept imports them."""

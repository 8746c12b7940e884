"""CustomContrast training (CustomContrast §3.3–3.4): its losses and the multi-view data the encoder learns from."""

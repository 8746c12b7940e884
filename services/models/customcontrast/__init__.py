"""CustomContrast's subject encoder (Multimodal Feature Injection, CustomContrast §3.2 = issue 21's "§3.1"): the
model a concept made without fine-tuning is drawn with, so train and generate both read it from here."""

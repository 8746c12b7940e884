"""Caption service: SID training descriptions per subject image, written by a vision-language model."""

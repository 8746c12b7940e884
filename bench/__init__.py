"""Benchmarks behind `persona-cli bench`: persona's training and sampling beside the reference implementations
(train.py, generate.py), the toy-world entanglement measure (quality.py), and the models they run on (models.py).
They sit outside services/ because no service runs them; the CLI reaches services only through this package."""

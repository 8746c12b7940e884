"""Triton model templates: the python-backend model.py adapters persona copies into each generated repository."""

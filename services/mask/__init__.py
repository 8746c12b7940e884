"""Mask service: choose the subject in a photo with clicks (P3S) or by naming it; masks feed masked training and evaluation."""

"""Evaluate service: measures concepts the way SID, DreamBench, P3S and CustomContrast do, and reports them."""

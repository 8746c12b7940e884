"""Generated gRPC stubs of the persona.v1 contracts (python tools/gen_protos.py)."""

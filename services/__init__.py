"""persona's five gRPC services and the runtime they share (import as persona.services)."""

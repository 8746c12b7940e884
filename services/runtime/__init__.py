"""What every persona service shares: errors, settings, stores, jobs, auth, interceptors, server."""

"""HTTP interface: versioned API blueprints, health probes and metrics."""

"""Per-batch stages: small dataclasses delegating to pure functions (no Ray here)."""

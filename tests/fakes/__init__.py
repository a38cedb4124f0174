"""Stand-ins for what the plumbing tests don't need to run for real (each says why)."""

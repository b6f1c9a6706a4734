"""Storage backends: one directory (`disk`), mirrored pairs of them (`pairs`)."""

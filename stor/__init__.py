"""stor: a content-addressed SHA-256 blob store on mirrored disk pairs."""

__version__ = "0.2.0"

"""The blob service: `BlobService` (facade.py) over its parts, one module each."""

from stor.service.facade import BlobService

__all__ = ["BlobService"]

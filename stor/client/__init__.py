"""A scriptable client for stor (and Stor-era servers): `StorClient` and its helpers."""

from stor.client.api import NOT_FOUND, ClientError, StorClient, hash_file, parse_credentials

__all__ = ["NOT_FOUND", "ClientError", "StorClient", "hash_file", "parse_credentials"]

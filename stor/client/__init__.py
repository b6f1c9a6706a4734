"""A scriptable client for stor (and Stor-era servers): `StorClient` and its helpers."""

from stor.client.api import StorClient, parse_credentials
from stor.client.errors import NOT_FOUND, ClientError
from stor.client.files import hash_file

__all__ = ["NOT_FOUND", "ClientError", "StorClient", "hash_file", "parse_credentials"]

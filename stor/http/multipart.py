"""One file field out of a `multipart/form-data` body, streamed (what `curl -F` sends).

The only module that imports `python_multipart`. The field's bytes are yielded as they arrive,
so a form upload is never held whole in memory. Malformed bodies and a missing field are
`BadRequest`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from stor.errors import BadRequest


@dataclass
class _State:
    in_field: bool = False
    found: bool = False
    disposition: bytes = b""


def is_multipart(content_type: str | None) -> bool:
    return bool(content_type) and parse_options_header(content_type)[0] == b"multipart/form-data"


async def form_field(chunks: AsyncIterator[bytes], content_type: str, field: str) -> AsyncIterator[bytes]:
    """The bytes of the first part named `field`, as they arrive."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    wanted = field.encode()
    out: list[bytes] = []
    header_name, header_value = bytearray(), bytearray()
    state = _State()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header_name).lower() == b"content-disposition":
            state.disposition = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        params = parse_options_header(state.disposition)[1] if state.disposition else {}
        state.in_field = params.get(b"name") == wanted and not state.found
        state.found = bool(state.found or state.in_field)
        state.disposition = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.in_field:
            out.append(data[start:end])

    def on_part_end() -> None:
        state.in_field = False

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
            if out:
                yield b"".join(out)
                out.clear()
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart/form-data body: {exc}") from None
    if out:
        yield b"".join(out)
    if not state.found:
        raise BadRequest(f"the multipart/form-data body has no {field!r} field")

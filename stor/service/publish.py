"""The event-loop side of a group commit: an upload's staged copies made durable, then visible.

After `PairWrite.stage(group=True)` the copies on filesystems with group commit are complete
but not yet durable; the others were fsynced by `stage`. Here, in order:

1. every grouped copy is made durable by its filesystem's next `syncfs`;
2. then every copy is linked under its blob name: the grouped ones by their filesystem's
   commit thread (durable after one more `syncfs`), the others with `TempFile.commit` in one
   thread hop.

When every copy is grouped (the usual case) the commit threads chain the two phases
themselves, and the upload waits once. No copy becomes visible before every copy, and the S3
queue marker `stage` left beside the first, is durable. Waiting holds no thread. A cancelled
caller still waits for the commit threads to let go of its temps, so its cleanup
(`PairWrite.abort`) never races them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from stor.backends.groupcommit import GroupCommits, Linked
from stor.backends.pairs import PairWrite, settle
from stor.backends.temps import TempFile
from stor.digest import Sha
from stor.service.offload import Offload


async def publish(writer: PairWrite, sha: Sha, commits: GroupCommits, offload: Offload) -> list[str]:
    """The paths of every copy once all are durable and linked; raises the first failure (the
    caller then aborts the writer: a copy already linked stays, it is a valid blob)."""
    grouped = [temp for temp in writer.temps if temp.groupable]
    alone = [temp for temp in writer.temps if not temp.groupable]
    if not alone:
        (done,) = await _all([asyncio.wrap_future(commits.commit(grouped, sha))])
    else:
        await _all([asyncio.wrap_future(commits.durable(grouped))])
        linked, solo = await _all(
            [
                asyncio.wrap_future(commits.link(grouped, sha)),
                asyncio.ensure_future(offload.run(_commit_each, alone, sha)),
            ]
        )
        done = linked + solo
    if all(created for _, created in done):
        return [path for path, _ in done]
    return await offload.run(settle, done)  # another process won a race: align the mtimes


def _commit_each(temps: list[TempFile], sha: Sha) -> list[Linked]:
    return [temp.commit(sha) for temp in temps]


async def _all(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Every result, once all are done, even when the caller is cancelled meanwhile; the
    first failure is raised (every outcome is retrieved, so none is reported as unseen)."""
    try:
        await asyncio.shield(asyncio.wait(futures))
    except asyncio.CancelledError:
        await asyncio.wait(futures)
        _first_error(futures)
        raise
    error = _first_error(futures)
    if error is not None:
        raise error
    return [future.result() for future in futures]


def _first_error(futures: list[asyncio.Future[Any]]) -> BaseException | None:
    errors = [future.exception() for future in futures if not future.cancelled()]
    return next((error for error in errors if error is not None), None)

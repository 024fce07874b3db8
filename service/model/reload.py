"""Reloading thing models in running ``serve`` processes, wherever they run.

``pointgate model reload`` checks the models directory, then sends ``NOTIFY pointgate_models`` through the
database every ``serve`` uses; each ``serve`` (LISTENing, service/devices/presence.py) re-reads its own
``--models`` directory and answers on ``pointgate_models_result`` with whether the new set was taken or refused.
SIGHUP does the same for one process. A refused set leaves the previous models in place.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import asyncpg

RELOAD_CHANNEL = "pointgate_models"
RELOAD_RESULT_CHANNEL = "pointgate_models_result"


@dataclass(frozen=True, slots=True)
class ReloadAnswer:
    """One serve's answer to a reload request."""

    instance: str
    ok: bool
    message: str


async def request_reload(conn: asyncpg.Connection, *, wait_s: float = 3.0) -> list[ReloadAnswer]:
    """Ask every serve on this database to reload its models; return the answers that came within ``wait_s``."""
    request = uuid.uuid4().hex
    answers: list[ReloadAnswer] = []
    arrived = asyncio.Event()

    def on_answer(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            answer = json.loads(str(payload))
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("request") == request:
            answers.append(ReloadAnswer(str(answer["instance"]), bool(answer["ok"]), str(answer["message"])))
            arrived.set()

    await conn.add_listener(RELOAD_RESULT_CHANNEL, on_answer)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", RELOAD_CHANNEL, request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), left)
            except TimeoutError:
                break
    finally:
        await conn.remove_listener(RELOAD_RESULT_CHANNEL, on_answer)
    return answers

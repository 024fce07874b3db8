"""Gateways: their topology (``thing.topo.*``) and their sub-devices' sessions (``combine.*``), in the broker.

A sub-device logged in through a gateway (``combine.login``) is online *on that gateway's connection*: its
topics become the connection's own (service/broker/connection.py, the broker's subscribe and delivery checks),
and the ingest accepts its batch items without ``allowOfflineSubDevice``. The session ends with
``combine.logout``, with the gateway's connection, when the sub-device is logged in through another connection,
or when the registry no longer lists it as the gateway's enabled sub-device (`SubDeviceSessions.prune`, run by
the service's periodic topology refresh). Sessions live in the worker that holds the gateway's connection.

Requests are decided by the pure functions of service/protocol/gateway.py over what the registry answers; the
database work runs in a task per request (these are rare next to measurement points), and the answer goes out
through the request's ticket, in order with the connection's other answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import asyncpg

from service.broker.requests import Caller, answer, refuse
from service.devices import activation, registry
from service.devices.secretbox import SecretBox
from service.errors import DeviceFault, DeviceNotFound, TopologyRefused
from service.ops import metrics
from service.ops.logs import get_logger
from service.protocol import gateway as proto
from service.protocol import replies
from service.protocol.envelope import decode_envelope
from service.protocol.replies import ReplyCode
from service.protocol.topics import DeviceRequest

if TYPE_CHECKING:
    from service.broker.ingest import Ingest, Ticket

log = get_logger("pointgate.gateways")

Key = tuple[str, str]
_NONE: frozenset[Key] = frozenset()


class SubDeviceSessions:
    """Which sub-device is logged in through which gateway connection (this worker's)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._where: dict[Key, Caller] = {}
        self._logins = 0  # counts logins: a registry snapshot taken before a login must not end it (`prune`)
        self._since: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def through(self, key: Key) -> Caller | None:
        """The connection ``key`` is logged in through, if any."""
        return self._where.get(key)

    def login(self, caller: Caller, key: Key) -> bool:
        """Log ``key`` in through ``caller``; False when that would pass the limit (nothing changes then)."""
        current = self._where.get(key)
        if current is caller:
            return True
        if len(caller.sub_devices) >= self.limit:
            return False
        if current is not None:
            self._end(current, key)  # logged in through another connection (of the same gateway) until now
        if not isinstance(caller.sub_devices, set):
            caller.sub_devices = set()  # idle connections share one empty frozenset
        caller.sub_devices.add(key)
        self._where[key] = caller
        self._logins += 1
        self._since[key] = self._logins
        metrics.SUB_DEVICES_ONLINE.inc()
        return True

    def logout(self, caller: Caller, key: Key) -> bool:
        """End ``key``'s session through ``caller``; False when it had none there."""
        if self._where.get(key) is not caller:
            return False
        self._end(caller, key)
        return True

    def closed(self, caller: Caller) -> None:
        """The gateway's connection ended: every session on it ends."""
        for key in list(caller.sub_devices):
            if self._where.get(key) is caller:
                self._end(caller, key)
        caller.sub_devices = _NONE

    def mark(self) -> int:
        """Taken before reading the registry, handed to `prune` with what was read."""
        return self._logins

    def prune(self, pairs: frozenset[tuple[Key, Key]], mark: int) -> int:
        """End every session older than ``mark`` whose (gateway, sub-device) relation of an enabled sub-device is
        gone from ``pairs``; how many."""
        ended = 0
        for key, caller in list(self._where.items()):
            gateway = caller.identity
            if gateway is not None and self._since.get(key, 0) <= mark and (gateway, key) not in pairs:
                log.info(
                    "sub-device session ended",
                    gateway="/".join(gateway),
                    sub_device="/".join(key),
                    reason="disabled or no longer in the gateway's topology",
                )
                self._end(caller, key)
                ended += 1
        return ended

    def _end(self, caller: Caller, key: Key) -> None:
        del self._where[key]
        self._since.pop(key, None)
        if isinstance(caller.sub_devices, set):
            caller.sub_devices.discard(key)
        metrics.SUB_DEVICES_ONLINE.dec()


Work = Callable[[Any, Any, Key], Coroutine[Any, Any, tuple[ReplyCode, str, Any]]]


class Gateways:
    """The handlers of the topology and sub-device session requests (service/broker/requests.py routes them)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox,
        sessions: SubDeviceSessions,
        *,
        ingest: Ingest | None = None,
        max_payload_bytes: int = 512 * 1024,
    ) -> None:
        self._pool = pool
        self._box = box
        self.sessions = sessions
        self._ingest = ingest
        self._max_bytes = max_payload_bytes
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Cancel requests still waiting for the database (shutting down: they are not answered)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- topology ---------------------------------------------------------------------------------------
    def topo_get(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``thing.topo.get``: the gateway's sub-devices, ``data`` a list of ``{productKey, deviceKey}``."""

        async def work(request_id: Any, params: Any, gateway: Key) -> tuple[ReplyCode, str, Any]:
            proto.check_topo_get(params)
            found = await registry.sub_devices_of(self._pool, gateway)
            return ReplyCode.OK, "", [proto.device_json(key) for key in found]

        self._start(request, payload, ticket, caller, work)

    def topo_add(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``thing.topo.add``: sub-devices join the gateway, each proven by its own signature; all or none."""

        async def work(request_id: Any, params: Any, gateway: Key) -> tuple[ReplyCode, str, Any]:
            items = proto.parse_topo_add(params)
            keys = [item.key for item in items]
            records = await self._records(keys)
            parents = await registry.gateways_among(self._pool, keys)
            for item in items:
                problem = proto.check_topo_add(item, records.get(item.key), gateway, is_gateway=item.key in parents)
                if problem is not None:
                    raise DeviceFault(ReplyCode.TOPO_ADD_FAILED, problem)
            async with self._pool.acquire() as conn:
                try:
                    await registry.attach_sub_devices(conn, gateway, keys)
                except (TopologyRefused, DeviceNotFound) as exc:
                    raise DeviceFault(ReplyCode.TOPO_ADD_FAILED, str(exc)) from None
            if self._ingest is not None:  # at once in this worker; the periodic refresh brings the others
                self._ingest.sub_devices = self._ingest.sub_devices | {(gateway, key) for key in keys}
            log.info("topology added", gateway="/".join(gateway), sub_devices=["/".join(key) for key in keys])
            return ReplyCode.OK, "", {}

        self._start(request, payload, ticket, caller, work)

    def topo_delete(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``thing.topo.delete``: sub-devices leave the gateway; refused while one is online; all or none."""

        async def work(request_id: Any, params: Any, gateway: Key) -> tuple[ReplyCode, str, Any]:
            keys = proto.parse_device_list(params, ReplyCode.TOPO_DELETE_FAILED)
            for key in keys:
                if self.sessions.through(key) is not None:
                    raise DeviceFault(ReplyCode.TOPO_DELETE_FAILED, f"{key[0]}/{key[1]} is online; log it out first")
            async with self._pool.acquire() as conn:
                try:
                    await registry.detach_sub_devices(conn, gateway, keys)
                except (TopologyRefused, DeviceNotFound) as exc:
                    raise DeviceFault(ReplyCode.TOPO_DELETE_FAILED, str(exc)) from None
            if self._ingest is not None:
                self._ingest.sub_devices = self._ingest.sub_devices - {(gateway, key) for key in keys}
            log.info("topology removed", gateway="/".join(gateway), sub_devices=["/".join(key) for key in keys])
            return ReplyCode.OK, "", {}

        self._start(request, payload, ticket, caller, work)

    # --- sub-device sessions ----------------------------------------------------------------------------
    def login(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``combine.login``: one sub-device, signed as its CONNECT would be; ``data`` names it."""

        async def work(request_id: Any, params: Any, gateway: Key) -> tuple[ReplyCode, str, Any]:
            login = proto.parse_login(params)
            records = await self._records([login.key])
            fault = proto.check_login(login, records.get(login.key), gateway)
            if fault is not None:
                raise fault
            self._online(caller, login.key)
            await self._activated([login.key])
            return ReplyCode.OK, "", proto.device_json(login.key)

        self._start(request, payload, ticket, caller, work)

    def login_batch(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``combine.login.batch``: each sub-device on its own; the first failure's code, both lists in ``data``."""

        async def work(request_id: Any, params: Any, gateway: Key) -> tuple[ReplyCode, str, Any]:
            logins = proto.parse_login_batch(params)
            records = await self._records([login.key for login in logins])
            logged_in: list[Key] = []
            failed: list[Key] = []
            faults: list[DeviceFault] = []
            for login in logins:
                fault = proto.check_login(login, records.get(login.key), gateway)
                if fault is None:
                    try:
                        self._online(caller, login.key)
                    except DeviceFault as exc:
                        fault = exc
                if fault is None:
                    logged_in.append(login.key)
                else:
                    failed.append(login.key)
                    faults.append(fault)
            await self._activated(logged_in)
            data = proto.batch_data(logged_in, failed)
            if not faults:
                return ReplyCode.OK, "", data
            # EnOS: "pk&dk has error: <message>;" for each failure, under the first failure's code
            text = "".join(f"{k[0]}&{k[1]} has error: {f.text};" for k, f in zip(failed, faults, strict=True))
            return faults[0].code, text, data

        self._start(request, payload, ticket, caller, work, failure_data=proto.batch_data([], []))

    def logout(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """``combine.logout``: the sub-device's session on this connection ends (200 also when it had none)."""
        try:
            request_id, params = decode_envelope(payload, request.method, max_bytes=self._max_bytes)
            key = proto.parse_logout(params)
        except DeviceFault as fault:
            refuse(request, payload, ticket, caller, fault.code, fault.detail, request_id=fault.request_id)
            return
        ended = self.sessions.logout(caller, key)
        text = "" if ended else f"{key[0]}/{key[1]} was not logged in through this connection"
        answer(request, ticket, request_id, ReplyCode.OK, text, proto.device_json(key))

    # --- shared -------------------------------------------------------------------------------------------
    def _online(self, caller: Caller, key: Key) -> None:
        if caller.closing:
            raise DeviceFault(ReplyCode.NO_WRITE_PERMISSION, "the gateway's connection closed")
        if not self.sessions.login(caller, key):
            limit = self.sessions.limit
            detail = f"{limit} sub-devices are online through this gateway (max_sub_devices_per_gateway)"
            raise DeviceFault(ReplyCode.TOO_MANY_SUB_DEVICES, detail)

    async def _activated(self, keys: list[Key]) -> None:
        # a sub-device that proved its device secret is activated, as by its first secure-mode-2 CONNECT: no
        # product secret may claim it afterwards (service/devices/activation.py); a failure costs only that
        for key in keys:
            try:
                await activation.mark_activated(self._pool, *key)
            except Exception as exc:
                log.warning("could not record activation", product=key[0], device=key[1], error=str(exc))

    async def _records(self, keys: list[Key]) -> dict[Key, proto.Record]:
        found = await registry.login_records(self._pool, self._box, keys)
        return {key: proto.Record(*value) for key, value in found.items()}

    def _start(
        self,
        request: DeviceRequest,
        payload: bytes,
        ticket: Ticket,
        caller: Caller,
        work: Work,
        *,
        failure_data: Any = None,
    ) -> None:
        try:
            request_id, params = decode_envelope(payload, request.method, max_bytes=self._max_bytes)
        except DeviceFault as fault:
            detail, request_id = fault.detail, fault.request_id
            refuse(request, payload, ticket, caller, fault.code, detail, request_id=request_id, data=failure_data)
            return
        # a gateway acts for itself (its topic is its own; anonymous sessions: the topic's device)
        gateway = request.device
        task = asyncio.create_task(
            self._run(request, payload, ticket, caller, work, request_id, params, gateway, failure_data)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        request: DeviceRequest,
        payload: bytes,
        ticket: Ticket,
        caller: Caller,
        work: Work,
        request_id: Any,
        params: Any,
        gateway: Key,
        failure_data: Any,
    ) -> None:
        try:
            code, text, data = await work(request_id, params, gateway)
        except DeviceFault as fault:
            refuse(request, payload, ticket, caller, fault.code, fault.detail, request_id=request_id, data=failure_data)
            return
        except asyncio.CancelledError:
            ticket.abandon()
            raise
        except Exception as exc:
            # our side (the registry is unreachable): the device gets an answer and may retry
            log.warning("request failed", topic=request.topic, error=str(exc) or type(exc).__name__)
            text = replies.message(ReplyCode.INTERNAL_ERROR, "the device registry could not be reached")
            answer(request, ticket, request_id, ReplyCode.INTERNAL_ERROR, text, failure_data)
            return
        if code is not ReplyCode.OK:  # a batch login in part refused: ``text`` is already worded per device
            log.info("request rejected", topic=request.topic, client_id=caller.client_id, code=int(code), reason=text)
        answer(request, ticket, request_id, code, text, data)

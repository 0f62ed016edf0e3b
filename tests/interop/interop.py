#!/usr/bin/env python3
"""Independent Chorus protocol v1 interop client.

Written from docs/protocol.md only (no server source was read). It speaks the three
encodings/transports the document defines:

  * WebSocket, JSON text messages            (user A)
  * WebSocket, MessagePack binary messages   (user B)
  * QUIC, ALPN chorus/1, one bidirectional stream, 4-byte big-endian length prefix,
    MessagePack                              (user C)

Usage:
  python3 tests/interop/interop.py --ws ws://127.0.0.1:17070/ws --quic 127.0.0.1:17071 \
      --ca PATH/ca.pem --secret chorus-dev-secret

Needs: pip install websockets aioquic msgpack   (Python 3.11+)
Exit status 0 iff every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
import sys
import time
import urllib.request
from typing import Any, Callable

try:
    import msgpack
    import websockets
    from websockets.asyncio.client import connect as ws_connect
    from aioquic.asyncio import connect as quic_connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import (
        ConnectionTerminated,
        DatagramFrameReceived,
        QuicEvent,
        StreamDataReceived,
        StreamReset,
    )
except ImportError as e:  # pragma: no cover
    print(f"FAIL setup: missing Python package ({e}); pip install websockets aioquic msgpack")
    sys.exit(2)

OVERALL_TIMEOUT = 60.0  # seconds, whole run
STEP_TIMEOUT = 10.0  # seconds, default deadline of one step

# §9.1 error codes used below
E_UNKNOWN_KIND = 1002
E_UNAUTHENTICATED = 2000
E_INVALID_TOKEN = 2001


def close_code(c: int) -> int:
    """§9.2 close-code formula."""
    return 4000 + (c % 1000) + 100 * (c // 1000 - 1)


# ---------------------------------------------------------------------------------------
# JWT HS256 (§5.2), standard library only
# ---------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_jwt(secret: str, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    header = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{h}.{p}".encode("ascii")
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


def user_token(secret: str, user: str, ttl: int = 3600) -> str:
    now = int(time.time())
    return mint_jwt(secret, {"sub": user, "exp": now + ttl, "iat": now})


# ---------------------------------------------------------------------------------------
# Result reporting
# ---------------------------------------------------------------------------------------


class CheckFailed(Exception):
    pass


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    line = f"{'PASS' if ok else 'FAIL'} {name}"
    if detail:
        line += f" — {detail}"
    print(line, flush=True)


def log(msg: str) -> None:
    if VERBOSE:
        print(f"      {msg}", flush=True)


VERBOSE = False


# ---------------------------------------------------------------------------------------
# Connection abstraction (transport independent part of §4/§5)
# ---------------------------------------------------------------------------------------


class Conn:
    """One protocol connection. Subclasses implement _send_frame / transport setup and
    call self._on_frame(dict) for each received frame and self._on_closed(code, reason)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.next_seq = 1  # §5.3: 1, 2, 3, … per connection
        self.pending: dict[int, asyncio.Future] = {}
        self.ntfs: list[dict] = []  # processed notifications, in order
        self.last_processed = 0  # §5.5
        self.seq0: list[dict] = []  # seq-0 error responses (§5.3)
        self.violations: list[str] = []  # protocol deviations seen by this client
        self.server_pings: list[int] = []  # seqs of server pings we answered (§5.4)
        self.changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.session: dict | None = None
        self.answer_pings = True  # False only for the negative control of check 6

    # -- transport hooks ------------------------------------------------------------------
    async def _send_frame(self, frame: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- receive path ---------------------------------------------------------------------
    def _on_frame(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            self.violations.append(f"non-map frame received: {frame!r}")
            return
        t = frame.get("type")
        seq = frame.get("seq")
        if t == "res":
            fut = self.pending.pop(seq, None) if isinstance(seq, int) else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(frame)
            elif seq == 0:
                log(f"[{self.name}] seq-0 response: {frame}")
                self.seq0.append(frame)
            else:
                self.violations.append(f"response for unknown seq: {frame!r}")
        elif t == "ntf":
            if not isinstance(seq, int):
                self.violations.append(f"ntf without integer seq: {frame!r}")
            elif seq <= self.last_processed:
                log(f"[{self.name}] duplicate ntf {seq} ignored")
            else:
                if seq != self.last_processed + 1:
                    self.violations.append(
                        f"notification gap: expected seq {self.last_processed + 1}, got {seq}"
                    )
                self.last_processed = seq
                self.ntfs.append(frame)
                log(f"[{self.name}] ntf {seq} {frame.get('kind')} {frame.get('body')}")
        elif t == "req":
            if frame.get("kind") == "ping" and isinstance(seq, int):
                # §5.4: answer with a success response echoing the server's seq, at once,
                # in any state. Not a request: does not touch next_seq.
                self.server_pings.append(seq)
                if self.answer_pings:
                    log(f"[{self.name}] server ping {seq} -> answering")
                    asyncio.ensure_future(self._answer_ping(seq))
            else:
                self.violations.append(f"unexpected server request: {frame!r}")
        else:
            self.violations.append(f"frame of unknown type: {frame!r}")
        self.changed.set()

    async def _answer_ping(self, seq: int) -> None:
        try:
            await self._send_frame(ping_answer(seq))
        except Exception as e:  # connection may be closing
            log(f"[{self.name}] could not answer ping {seq}: {e}")

    def _on_closed(self, code: int | None, reason: str) -> None:
        if not self.closed.is_set():
            self.close_code = code
            self.close_reason = reason
            self.closed.set()
            log(f"[{self.name}] closed code={code} reason={reason!r}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(CheckFailed(f"{self.name}: connection closed ({code} {reason!r})"))
        self.pending.clear()
        self.changed.set()

    # -- request path ---------------------------------------------------------------------
    async def request(self, kind: str, body: dict | None = None, timeout: float = STEP_TIMEOUT) -> dict:
        if self.closed.is_set():
            raise CheckFailed(f"{self.name}: connection already closed ({self.close_code})")
        seq = self.next_seq
        self.next_seq += 1
        frame: dict[str, Any] = {"type": "req", "seq": seq, "kind": kind}
        if body is not None:
            frame["body"] = body
        fut = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        await self._send_frame(frame)
        try:
            res = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self.pending.pop(seq, None)
            raise CheckFailed(f"{self.name}: no response to {kind} (seq {seq}) within {timeout}s")
        require(res.get("seq") == seq, f"{self.name}: response seq mismatch {res}")
        return res

    async def ok(self, kind: str, body: dict | None = None, timeout: float = STEP_TIMEOUT) -> dict:
        res = await self.request(kind, body, timeout)
        err = res.get("error")
        if err is not None:
            raise CheckFailed(f"{self.name}: {kind} failed: {err}")
        ok = res.get("ok")
        if ok is None:
            ok = {}
        require(isinstance(ok, dict), f"{self.name}: {kind}: ok is not a map: {res}")
        return ok

    async def error(self, kind: str, body: dict | None = None, timeout: float = STEP_TIMEOUT) -> dict:
        res = await self.request(kind, body, timeout)
        err = res.get("error")
        require(err is not None, f"{self.name}: {kind}: expected an error response, got {res}")
        require(isinstance(err, dict), f"{self.name}: error is not a map: {res}")
        require(isinstance(err.get("code"), int), f"{self.name}: error without integer code: {res}")
        require(isinstance(err.get("message"), str), f"{self.name}: error without message: {res}")
        return err

    async def auth(self, user: str, token: str) -> dict:
        ok = await self.ok("auth", {"token": token, "protocol_version": 1})
        check_auth_ok(ok, user, self.name)
        self.session = ok
        self.last_processed = ok["notification_seq"]  # 0 for a new session (§5.5)
        return ok

    async def wait_until(self, pred: Callable[[], Any], what: str, timeout: float = STEP_TIMEOUT) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            r = pred()
            if r:
                return r
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CheckFailed(f"{self.name}: timed out after {timeout}s waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def comments(self, room_id: str) -> list[dict]:
        return [
            n["body"]
            for n in self.ntfs
            if n.get("kind") == "room.comment" and isinstance(n.get("body"), dict)
            and n["body"].get("room_id") == room_id
        ]

    async def wait_comment(self, room_id: str, comment_id: int, timeout: float = STEP_TIMEOUT) -> dict:
        def find():
            for c in self.comments(room_id):
                if c.get("comment_id") == comment_id:
                    return c
            return None

        return await self.wait_until(find, f"room.comment {comment_id} in {room_id}", timeout)

    async def wait_closed(self, timeout: float = STEP_TIMEOUT) -> None:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            raise CheckFailed(f"{self.name}: server did not close the connection within {timeout}s")


def ping_answer(seq: int) -> dict:
    """§5.4 / §12 item 4: the answer to a server ping request."""
    return {"type": "res", "seq": seq, "ok": {}}


def check_auth_ok(ok: dict, user: str, who: str) -> None:
    """§6.1: all fields of the auth ok body are always present."""
    for f in (
        "protocol_version",
        "user_id",
        "session_id",
        "resume",
        "notification_seq",
        "node",
        "ping_interval_ms",
        "resume_window_ms",
    ):
        require(f in ok, f"{who}: auth ok lacks {f!r}: {ok}")
    require(ok["protocol_version"] == 1, f"{who}: protocol_version {ok['protocol_version']!r}")
    require(ok["user_id"] == user, f"{who}: user_id {ok['user_id']!r} != {user!r}")
    require(isinstance(ok["session_id"], str) and ok["session_id"], f"{who}: bad session_id")
    require(ok["resume"] == "new", f"{who}: resume {ok['resume']!r}, expected 'new'")
    require(ok["notification_seq"] == 0, f"{who}: notification_seq {ok['notification_seq']!r}")
    require(isinstance(ok["ping_interval_ms"], int) and ok["ping_interval_ms"] > 0, f"{who}: bad ping_interval_ms")


ROOMINFO_FIELDS = (
    "room_id",
    "title",
    "host",
    "state",
    "scheduled_start_ms",
    "created_at_ms",
    "listener_count",
    "comment_count",
)


def check_room_info(room: Any, who: str) -> None:
    require(isinstance(room, dict), f"{who}: RoomInfo is not a map: {room!r}")
    for f in ROOMINFO_FIELDS:
        require(f in room, f"{who}: RoomInfo lacks {f!r}: {room}")
    require(room["state"] in ("scheduled", "live", "ended"), f"{who}: bad state {room['state']!r}")


# ---------------------------------------------------------------------------------------
# WebSocket transport (§3.1)
# ---------------------------------------------------------------------------------------


class WsConn(Conn):
    def __init__(self, name: str, url: str, encoding: str, subprotocol: bool) -> None:
        super().__init__(name)
        assert encoding in ("json", "msgpack")
        self.url = url
        self.encoding = encoding
        self.subprotocol = subprotocol
        self.ws = None
        self.reader: asyncio.Task | None = None

    async def open(self, timeout: float = STEP_TIMEOUT) -> "WsConn":
        kwargs: dict[str, Any] = {"open_timeout": timeout, "max_size": 1 << 20}
        if self.subprotocol:
            kwargs["subprotocols"] = ["chorus.v1"]
        self.ws = await ws_connect(self.url, **kwargs)
        if self.subprotocol:
            sp = self.ws.subprotocol
            if sp not in (None, "chorus.v1"):
                self.violations.append(f"server chose subprotocol {sp!r}")
        self.reader = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        code, reason = None, ""
        try:
            async for msg in self.ws:
                if isinstance(msg, str):
                    if self.encoding != "json":
                        self.violations.append("server sent a text message on a MessagePack connection")
                    try:
                        frame = json.loads(msg)
                    except ValueError:
                        self.violations.append(f"invalid JSON from server: {msg!r}")
                        continue
                else:
                    if self.encoding != "msgpack":
                        self.violations.append("server sent a binary message on a JSON connection")
                    try:
                        frame = msgpack.unpackb(msg, raw=False)
                    except Exception:
                        self.violations.append(f"invalid MessagePack from server: {msg!r}")
                        continue
                self._on_frame(frame)
        except websockets.ConnectionClosed:
            pass
        except Exception as e:
            reason = f"reader error: {e!r}"
        finally:
            rcvd = getattr(self.ws, "close_code", None)
            if rcvd is not None:
                code = rcvd
                reason = getattr(self.ws, "close_reason", "") or reason
            self._on_closed(code, reason)

    async def _send_frame(self, frame: dict) -> None:
        if self.encoding == "json":
            await self.ws.send(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))
        else:
            await self.ws.send(msgpack.packb(frame, use_bin_type=True))

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(code=1000), 3)
            except Exception:
                pass
        if self.reader is not None:
            self.reader.cancel()


# ---------------------------------------------------------------------------------------
# QUIC transport (§3.2)
# ---------------------------------------------------------------------------------------


class ChorusQuicProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn: QuicConn | None = None
        self.stream_id: int | None = None
        self.buf = bytearray()

    def quic_event_received(self, event: QuicEvent) -> None:
        conn = self.conn
        if isinstance(event, StreamDataReceived):
            if conn is None:
                return
            if event.stream_id != self.stream_id:
                conn.violations.append(f"data on unexpected stream {event.stream_id}")
                return
            self.buf += event.data
            while len(self.buf) >= 4:
                (length,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) < 4 + length:
                    break
                payload = bytes(self.buf[4 : 4 + length])
                del self.buf[: 4 + length]
                try:
                    frame = msgpack.unpackb(payload, raw=False)
                except Exception:
                    conn.violations.append(f"invalid MessagePack on QUIC: {payload!r}")
                    continue
                conn._on_frame(frame)
            if event.end_stream:
                log(f"[{conn.name}] server finished the stream")
        elif isinstance(event, StreamReset):
            if conn is not None:
                log(f"[{conn.name}] stream reset, code {event.error_code}")
        elif isinstance(event, DatagramFrameReceived):
            pass  # §3.2: reserved for voice; MAY be ignored
        elif isinstance(event, ConnectionTerminated):
            if conn is not None:
                conn._on_closed(event.error_code, event.reason_phrase)


class QuicConn(Conn):
    def __init__(self, name: str, host: str, port: int, cafile: str, server_name: str) -> None:
        super().__init__(name)
        self.host, self.port, self.cafile, self.server_name = host, port, cafile, server_name
        self.cm = None
        self.proto: ChorusQuicProtocol | None = None

    async def open(self, timeout: float = STEP_TIMEOUT) -> "QuicConn":
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["chorus/1"])
        cfg.verify_mode = ssl.CERT_REQUIRED
        cfg.load_verify_locations(cafile=self.cafile)  # the cluster CA as the only root
        cfg.server_name = self.server_name
        cfg.idle_timeout = 60.0
        self.cm = quic_connect(
            self.host,
            self.port,
            configuration=cfg,
            create_protocol=ChorusQuicProtocol,
            wait_connected=True,
        )
        try:
            self.proto = await asyncio.wait_for(self.cm.__aenter__(), timeout)
        except asyncio.TimeoutError:
            raise CheckFailed(f"{self.name}: QUIC handshake with {self.host}:{self.port} timed out after {timeout}s")
        except ConnectionError as e:
            raise CheckFailed(
                f"{self.name}: QUIC handshake with {self.host}:{self.port} failed "
                f"(wrong --ca, --sni or ALPN refused?): {e!r}"
            )
        self.proto.conn = self
        alpn = getattr(getattr(self.proto._quic, "tls", None), "alpn_negotiated", "chorus/1")
        require(alpn == "chorus/1", f"{self.name}: negotiated ALPN {alpn!r}")
        # §3.2: exactly one bidirectional stream, opened by the client.
        self.proto.stream_id = self.proto._quic.get_next_available_stream_id(is_unidirectional=False)
        return self

    async def _send_frame(self, frame: dict) -> None:
        if self.closed.is_set():
            raise CheckFailed(f"{self.name}: connection closed")
        payload = msgpack.packb(frame, use_bin_type=True)
        self.proto._quic.send_stream_data(self.proto.stream_id, struct.pack(">I", len(payload)) + payload)
        self.proto.transmit()

    async def close(self) -> None:
        if self.cm is not None:
            try:
                self.proto.close(error_code=0, reason_phrase="bye")
                await asyncio.wait_for(self.cm.__aexit__(None, None, None), 3)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def offline_self_test(secret: str) -> None:
    """Sanity: reproduce the §5.2 example token and the §4.4 MessagePack bytes."""
    if secret == "chorus-dev-secret":
        tok = mint_jwt(
            secret,
            {"sub": "alice", "exp": 4102444800, "iat": 1767225600},
            header={"typ": "JWT", "alg": "HS256"},
        )
        expected = (
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMCwiaWF0IjoxNzY3MjI1NjAwfQ"
            ".SuOUE77cjD-ADezEUjUlM_KbwaA5Mv_uUo77laqiefc"
        )
        require(tok == expected, f"JWT minting does not reproduce the §5.2 example token: {tok}")
    packed = msgpack.packb({"type": "req", "seq": 3, "kind": "room.join", "body": {"room_id": "r-1"}})
    expected_hex = (
        "84a474797065a3726571a3736571 03a46b696e64a9726f6f6d2e6a6f696ea4626f647981a7726f6f6d5f6964a3722d31"
    ).replace(" ", "")
    require(packed.hex() == expected_hex, f"§4.4 MessagePack example mismatch: {packed.hex()}")
    require(len(packed) == 48, "§4.4 example is not 48 bytes")
    require(close_code(3004) == 4204 and close_code(2001) == 4101, "close-code formula")


async def run(args: argparse.Namespace) -> None:
    nonce = os.urandom(4).hex()
    users = {k: f"interop-{k}-{nonce}" for k in ("a", "b", "c")}
    secret = args.secret
    host, _, port = args.quic.rpartition(":")
    host = host.strip("[]")
    server_name = args.sni or host
    conns: list[Conn] = []

    async def step(name: str, coro_fn: Callable[[], Any], timeout: float = 20.0) -> Any:
        try:
            r = await asyncio.wait_for(coro_fn(), timeout)
            report(name, True, r if isinstance(r, str) else "")
            return True
        except CheckFailed as e:
            report(name, False, str(e))
        except asyncio.TimeoutError:
            report(name, False, f"step deadline of {timeout}s exceeded")
        except Exception as e:  # transport errors etc.
            report(name, False, f"{type(e).__name__}: {e}")
        return False

    # 0. offline sanity of the encoders
    def _self_test():
        offline_self_test(secret)
        return "JWT §5.2 example reproduced, §4.4 MessagePack bytes reproduced"

    async def c0():
        return _self_test()

    await step("0 offline: JWT minting and MessagePack encoding match the document", c0)

    state: dict[str, Any] = {}
    a = WsConn("A/ws-json", args.ws, "json", subprotocol=True)
    b = WsConn("B/ws-msgpack", args.ws, "msgpack", subprotocol=False)
    c = QuicConn("C/quic", host, int(port), args.ca, server_name)

    # 1. WebSocket + JSON: auth A, create a room, join it
    async def c1():
        await a.open()
        conns.append(a)
        await a.auth(users["a"], user_token(secret, users["a"]))
        title = f"interop {nonce} ✓"
        ok = await a.ok("room.create", {"title": title})
        require(isinstance(ok.get("room_id"), str), f"room.create ok lacks room_id: {ok}")
        check_room_info(ok.get("room"), "room.create")
        require(ok["room"]["room_id"] == ok["room_id"], "room.create: room.room_id != room_id")
        require(ok["room"]["title"] == title, f"room.create: title {ok['room']['title']!r}")
        require(ok["room"]["host"] == users["a"], f"room.create: host {ok['room']['host']!r}")
        require(ok["room"]["state"] == "live", f"room.create: state {ok['room']['state']!r}")
        room_id = ok["room_id"]
        state["room_id"] = room_id
        j = await a.ok("room.join", {"room_id": room_id})
        check_room_info(j.get("room"), "room.join")
        require(j.get("role") == "host", f"A's role is {j.get('role')!r}, expected host")
        require(j.get("recent_comments") == [], f"recent_comments {j.get('recent_comments')!r}")
        return f"user {users['a']} session {a.session['session_id']} room {room_id} (node {a.session['node']})"

    await step("1 WebSocket/JSON: auth A, room.create, room.join", c1)

    # 2. WebSocket + MessagePack: auth B, join
    async def c2():
        require("room_id" in state, "no room (check 1 failed)")
        await b.open()
        conns.append(b)
        await b.auth(users["b"], user_token(secret, users["b"]))
        j = await b.ok("room.join", {"room_id": state["room_id"]})
        check_room_info(j.get("room"), "room.join")
        require(j.get("role") == "listener", f"B's role is {j.get('role')!r}, expected listener")
        require(not b.violations, f"violations: {b.violations}")
        return f"user {users['b']} joined as listener"

    await step("2 WebSocket/MessagePack: auth B, room.join", c2)

    # 3. QUIC: auth C, join
    async def c3():
        require("room_id" in state, "no room (check 1 failed)")
        await c.open()
        conns.append(c)
        await c.auth(users["c"], user_token(secret, users["c"]))
        j = await c.ok("room.join", {"room_id": state["room_id"]})
        check_room_info(j.get("room"), "room.join")
        require(j.get("role") == "listener", f"C's role is {j.get('role')!r}, expected listener")
        return f"user {users['c']} joined as listener (ALPN chorus/1, SNI {server_name})"

    await step("3 QUIC/MessagePack: auth C, room.join", c3)

    # 3l. room.list (§6.13a): the room is listed, newest first, with its listener count,
    # on WebSocket/JSON and on QUIC; pages follow `next`; a bad cursor is 4003.
    async def c3l():
        room_id = state.get("room_id")
        require(room_id is not None, "no room")
        found = None
        for x in (a, c):
            rooms, after, pages = [], None, 0
            while True:
                body = {"limit": 2} if after is None else {"limit": 2, "after": after}
                page = await x.ok("room.list", body)
                require(isinstance(page.get("rooms"), list), f"{x.name}: room.list ok lacks rooms: {page}")
                require(len(page["rooms"]) <= 2, f"{x.name}: a page of {len(page['rooms'])} over limit 2")
                rooms += page["rooms"]
                pages += 1
                after = page.get("next")
                if after is None or pages >= 500:
                    break
                require(isinstance(after, str), f"{x.name}: next {after!r}")
            keys = [(-r["created_at_ms"], r["room_id"]) for r in rooms]
            require(keys == sorted(keys), f"{x.name}: not newest first")
            mine = [r for r in rooms if r.get("room_id") == room_id]
            require(len(mine) == 1, f"{x.name}: the room is listed {len(mine)} times")
            entry = mine[0]
            for field in ("title", "host", "state", "created_at_ms", "listener_count"):
                require(field in entry, f"{x.name}: entry lacks {field}: {entry}")
            require(entry["state"] == "live", f"{x.name}: state {entry['state']!r}")
            require(entry["host"] == users["a"], f"{x.name}: host {entry['host']!r}")
            require(entry["listener_count"] == 3, f"{x.name}: listener_count {entry['listener_count']!r}, 3 joined")
            found = entry
        bad = await b.error("room.list", {"after": "not a cursor"})
        require(bad.get("code") == 4003, f"a bad cursor answered {bad}")
        return f"listed with listener_count {found['listener_count']} on WebSocket/JSON and QUIC"

    await step("3l room.list: listed newest first with its listener count, pages, bad cursor", c3l)

    # 4. comments fan out across transports, one order for everyone
    async def c4():
        room_id = state.get("room_id")
        require(room_id is not None, "no room")
        for x in (a, b, c):
            require(x in conns and not x.closed.is_set(), f"{x.name} is not connected")
        text_a = f"hello from A over WebSocket/JSON — {nonce} 🎵"
        ok = await a.ok("room.comment", {"room_id": room_id, "text": text_a})
        id_a = ok.get("comment_id")
        require(isinstance(id_a, int) and id_a >= 1, f"bad comment_id {ok}")
        got = {}
        for x in (a, b, c):  # the sender too (§6.8)
            got[x.name] = await x.wait_comment(room_id, id_a)
        for name, ev in got.items():
            require(ev.get("text") == text_a, f"{name}: text {ev.get('text')!r} != {text_a!r}")
            require(ev.get("user_id") == users["a"], f"{name}: user_id {ev.get('user_id')!r}")
            require(isinstance(ev.get("at_ms"), int), f"{name}: at_ms {ev.get('at_ms')!r}")
        text_c = f"reply from C over QUIC — {nonce} ✓"
        ok = await c.ok("room.comment", {"room_id": room_id, "text": text_c})
        id_c = ok.get("comment_id")
        require(isinstance(id_c, int) and id_c > id_a, f"bad comment_id for C {ok} (A's was {id_a})")
        for x in (a, b, c):
            ev = await x.wait_comment(room_id, id_c)
            require(ev.get("text") == text_c, f"{x.name}: text {ev.get('text')!r} != {text_c!r}")
            require(ev.get("user_id") == users["c"], f"{x.name}: user_id {ev.get('user_id')!r}")
        orders = {x.name: [(e["comment_id"], e["text"]) for e in x.comments(room_id)] for x in (a, b, c)}
        first = orders[a.name]
        for name, o in orders.items():
            require(o == first, f"order differs: {name} saw {o}, {a.name} saw {first}")
        ids = [i for i, _ in first]
        require(ids == list(range(1, len(ids) + 1)), f"comment_ids not 1,2,3,… without gaps: {ids}")
        for x in (a, b, c):
            require(not x.violations, f"{x.name}: {x.violations}")
        return f"comment_ids {ids} in the same order on A, B and C"

    await step("4 comments: A→(A,B,C), C→(A,B,C), same text/comment_id/order everywhere", c4)

    # 4b. At most once (§6.8): a comment resent with the same request_id, as a client does
    # after a timeout or a reconnect, gets the first comment_id and is posted once; C's
    # equal request_id is C's own request.
    async def c4b():
        room_id = state.get("room_id")
        require(room_id is not None, "no room")
        request_id = f"interop-{nonce}-1"
        text = f"sent twice, posted once — {nonce}"
        body = {"room_id": room_id, "text": text, "request_id": request_id}
        first = await a.ok("room.comment", body)
        again = await a.ok("room.comment", body)
        id_a = first.get("comment_id")
        require(isinstance(id_a, int), f"bad comment_id {first}")
        require(again.get("comment_id") == id_a, f"the retry answered {again}, the first {first}")
        other = await c.ok("room.comment", {"room_id": room_id, "text": "C's own", "request_id": request_id})
        id_c = other.get("comment_id")
        require(id_c == id_a + 1, f"C's request with A's request_id answered {other} (A's was {id_a})")
        # B has C's comment, so everything before it has arrived: A's text exactly once.
        await b.wait_comment(room_id, id_c)
        seen = [e for e in b.comments(room_id) if e.get("text") == text]
        require(len(seen) == 1, f"B saw A's comment {len(seen)} times: {seen}")
        bad = await a.error("room.comment", {"room_id": room_id, "text": "x", "request_id": "k" * 65})
        require(bad.get("code") == 4003, f"a 65-byte request_id answered {bad}")
        return f"request_id {request_id!r}: comment_id {id_a} twice, posted once; C's got {id_c}"

    await step("4b room.comment request_id: a retry gets the first answer, posted once", c4b)

    # 4a. A red-packet rain (§6.16): the operator creates one over the admin API; A, B and C
    # each grab once per transport, a repeated request_id gets the same packet back, a
    # second tap is refused by the cap, and an unknown rain is an error.
    async def c4a():
        require("room_id" in state, "no room (check 1 failed)")
        base = args.ws.replace("ws://", "http://", 1).rsplit("/ws", 1)[0]
        token = os.environ.get("CHORUS_ADMIN_TOKEN", "chorus-dev-admin")
        url = f"{base}/admin/rain?room={state['room_id']}&total=1000&count=10&cap=1&duration_ms=60000"

        def create() -> dict:
            req = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        rain = await asyncio.get_running_loop().run_in_executor(None, create)
        rain_id = rain.get("rain_id")
        require(isinstance(rain_id, str), f"rain create answered {rain}")
        packets = set()
        for x in (a, b, c):
            body = {"rain_id": rain_id, "request_id": f"tap-{x.name}"}
            ok = await x.ok("rain.grab", body)
            require(ok.get("rain_id") == rain_id, f"{x.name}: rain.grab answered {ok}")
            require(ok.get("result") == "granted", f"{x.name}: first tap not granted: {ok}")
            amount, packet, throttle = ok.get("amount"), ok.get("packet"), ok.get("throttle")
            require(isinstance(amount, int) and amount >= 1, f"{x.name}: amount {amount!r}")
            require(isinstance(packet, int) and packet not in packets, f"{x.name}: packet {packet!r}")
            require(isinstance(throttle, (int, float)) and 0 < throttle <= 1, f"{x.name}: throttle {throttle!r}")
            packets.add(packet)
            again = await x.ok("rain.grab", body)
            require(
                again.get("amount") == amount and again.get("packet") == packet,
                f"{x.name}: the same request_id got {again}, first {ok}",
            )
            capped = await x.ok("rain.grab", {"rain_id": rain_id, "request_id": f"tap2-{x.name}"})
            require(capped.get("result") == "cap_reached", f"{x.name}: a second tap with cap 1 got {capped}")
            require("amount" not in capped or capped["amount"] is None, f"{x.name}: cap_reached with an amount: {capped}")
        err = await a.error("rain.grab", {"rain_id": "rain-none", "request_id": "t"})
        require(err["code"] == 4003, f"an unknown rain gave {err}")
        return f"rain {rain_id}: packets {sorted(packets)} granted once each, repeats idempotent, cap enforced"

    await step("4a rain.grab on every transport: granted, idempotent, capped", c4a)

    # 5. ping, unknown kind, before-auth, forged token
    async def c5():
        details = []
        # 5a. client ping on each authenticated connection
        for x in (a, b, c):
            if x in conns and not x.closed.is_set():
                ok = await x.ok("ping")
                require(isinstance(ok.get("time_ms"), int), f"{x.name}: ping ok {ok}")
                require(abs(ok["time_ms"] - time.time() * 1000) < 120_000, f"{x.name}: time_ms far off: {ok}")
        details.append("ping→time_ms")
        # 5b. unknown kind → 1002, echoing seq; connection stays usable
        for x in (a, b, c):
            if x in conns and not x.closed.is_set():
                err = await x.error("no.such.kind", {"x": 1})
                require(err["code"] == E_UNKNOWN_KIND, f"{x.name}: unknown kind gave {err}, expected {E_UNKNOWN_KIND}")
                await x.ok("ping")
        details.append(f"unknown kind→{E_UNKNOWN_KIND}")
        # 5c. request before auth → 2000, not executed, connection stays open; ping allowed
        pre = WsConn("D/ws-json-preauth", args.ws, "json", subprotocol=False)
        await pre.open()
        conns.append(pre)
        err = await pre.error("room.info", {"room_id": state.get("room_id", "r-none")})
        require(err["code"] == E_UNAUTHENTICATED, f"pre-auth room.info gave {err}, expected {E_UNAUTHENTICATED}")
        ok = await pre.ok("ping")  # §5.1: ping served before auth
        require(isinstance(ok.get("time_ms"), int), f"pre-auth ping ok {ok}")
        require(not pre.closed.is_set(), "connection closed after a pre-auth request")
        await pre.auth(f"interop-d-{nonce}", user_token(secret, f"interop-d-{nonce}"))
        info = await pre.ok("room.info", {"room_id": state.get("room_id", "r-none")}) if "room_id" in state else {}
        if info:
            check_room_info(info, "room.info")
        await pre.close()
        # same over QUIC (MessagePack)
        preq = QuicConn("E/quic-preauth", host, int(port), args.ca, server_name)
        await preq.open()
        conns.append(preq)
        err = await preq.error("room.join", {"room_id": "r-none"})
        require(err["code"] == E_UNAUTHENTICATED, f"QUIC pre-auth room.join gave {err}")
        await preq.ok("ping")
        await preq.close()
        details.append(f"pre-auth request→{E_UNAUTHENTICATED} (WS and QUIC)")
        # 5d. forged token (signed with a wrong secret) → 2001, then close 4101
        forged_user = f"interop-mallory-{nonce}"
        forged = mint_jwt(secret + "-wrong", {"sub": forged_user, "exp": int(time.time()) + 3600})
        for mk in (
            lambda: WsConn("F/ws-json-forged", args.ws, "json", subprotocol=False),
            lambda: WsConn("G/ws-msgpack-forged", args.ws, "msgpack", subprotocol=False),
            lambda: QuicConn("H/quic-forged", host, int(port), args.ca, server_name),
        ):
            f = mk()
            await f.open()
            conns.append(f)
            err = await f.error("auth", {"token": forged, "protocol_version": 1})
            require(err["code"] == E_INVALID_TOKEN, f"{f.name}: forged token gave {err}, expected {E_INVALID_TOKEN}")
            await f.wait_closed()
            require(
                f.close_code == close_code(E_INVALID_TOKEN),
                f"{f.name}: close code {f.close_code} ({f.close_reason!r}), expected {close_code(E_INVALID_TOKEN)}",
            )
        details.append(f"forged token→{E_INVALID_TOKEN} + close {close_code(E_INVALID_TOKEN)} (WS JSON, WS MessagePack, QUIC)")
        return "; ".join(details)

    await step("5 ping / unknown kind / request before auth / forged token", c5, timeout=25.0)

    # 5v. voice messages (§14): A sends to B and C in chunks; B fetches it all over
    # WebSocket/MessagePack, C a range over QUIC, B marks it read and syncs; a browser-like
    # HTTP range request gets 206 with Content-Range.
    async def c5v():
        sample_path = os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "..", "..", "actors", "src", "voicemail", "testdata", "sine-1s.opus",
        )
        with open(sample_path, "rb") as f:
            audio = f.read()
        require(audio[:4] == b"OggS", "the sample is not an Ogg file")
        for x in (a, b, c):
            require(x in conns and not x.closed.is_set(), f"{x.name} is not connected")
        sent = await a.ok("vm.send", {"to": [users["b"], users["c"]]})
        mid = sent.get("message_id")
        require(isinstance(mid, str) and mid, f"vm.send ok lacks message_id: {sent}")
        members = sorted([users["a"], users["b"], users["c"]])
        require(sent.get("conversation") == "group:" + ",".join(members), f"conversation {sent.get('conversation')!r}")
        acked = 0
        offset = 0
        while offset < len(audio):
            end = min(offset + 600, len(audio))
            st = await a.ok("vm.chunk", {
                "message_id": mid, "offset": offset,
                "data": base64.b64encode(audio[offset:end]).decode(),
                "last": end == len(audio),
            })
            require(st.get("message_id") == mid, f"UploadState for another message: {st}")
            require(isinstance(st.get("acked"), int) and acked <= st["acked"] <= end, f"acked {st.get('acked')} after sending {end}")
            acked = st["acked"]
            offset = end
        require(st.get("status") == "complete" and acked == len(audio), f"final UploadState {st}")
        await b.wait_until(
            lambda: any(n.get("kind") == "vm.message" and n["body"].get("message_id") == mid for n in b.ntfs),
            "vm.message on B",
        )
        got = b""
        while True:
            f = await b.ok("vm.fetch", {"message_id": mid, "offset": len(got)})
            piece = base64.b64decode(f.get("data", ""))
            got += piece
            if not piece or len(got) >= f["acked"]:
                break
        require(got == audio, f"B fetched {len(got)} bytes, not the {len(audio)} sent")
        r = await c.ok("vm.fetch", {"message_id": mid, "offset": 100, "length": 200})
        require(base64.b64decode(r["data"]) == audio[100:300] and r["status"] == "complete", f"C's range fetch: {r.get('status')}")
        rd = await b.ok("vm.read", {"message_id": mid})
        require(rd["state"]["read"] is True and rd["state"]["version"] >= 2, f"vm.read state {rd}")
        page = await b.ok("vm.sync", {"device": "interop", "after": 0})
        entries = [e for e in page["entries"] if e["message_id"] == mid]
        require(len(entries) == 1 and entries[0]["state"]["read"] and entries[0]["sender"] == users["a"], f"vm.sync entries {page['entries']}")
        require(page["last_seq"] >= entries[0]["seq"] >= 1, f"last_seq {page['last_seq']}")
        err = await c.error("vm.fetch", {"message_id": "vm-no-such-message"})
        require(err["code"] == 4007, f"unknown message: {err}")
        http = args.ws.replace("ws://", "http://").rsplit("/ws", 1)[0]
        req = urllib.request.Request(
            f"{http}/vm/{mid}",
            headers={"Authorization": f"Bearer {user_token(secret, users['b'])}", "Range": "bytes=0-99"},
        )
        loop = asyncio.get_running_loop()
        def get():
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read()
        status, headers, body = await loop.run_in_executor(None, get)
        headers = {k.lower(): v for k, v in headers.items()}
        require(status == 206, f"HTTP range status {status}")
        require(headers.get("content-range") == f"bytes 0-99/{len(audio)}", f"Content-Range {headers.get('content-range')!r}")
        require(body == audio[:100], "HTTP range body differs")
        return f"{mid}: {len(audio)} bytes in {(len(audio) + 599) // 600} chunks, fetched over WS and QUIC, read, synced, HTTP 206"

    await step("5v voice messages: vm.send, vm.chunk, vm.fetch (WS, QUIC), vm.read, vm.sync, HTTP Range", c5v, timeout=30.0)

    # 6. server pings are answered (§5.4)
    async def c6():
        # The answer encoder must produce exactly the documented frame.
        require(ping_answer(7) == {"type": "res", "seq": 7, "ok": {}}, "ping answer shape")
        live = [x for x in (a, b, c) if x in conns and not x.closed.is_set() and x.session]
        require(live, "no live authenticated connection")
        interval = max(x.session["ping_interval_ms"] for x in live) / 1000.0
        loop = asyncio.get_running_loop()
        budget = args.deadline - loop.time() - 3.0
        if 4.0 * interval > budget:
            counts = ", ".join(f"{x.name}: {len(x.server_pings)}" for x in live)
            return (
                f"answering implemented, but the server ping interval ({interval:g} s) is too long to "
                f"observe within the {args.timeout:g} s budget; server pings answered so far: {counts}"
            )
        # Observable. Negative control: a connection that never answers must be closed with
        # 4204 (§5.4: two consecutive unanswered pings when the next is due), while the
        # answering connections survive at least three pings.
        mute = WsConn("M/ws-json-mute", args.ws, "json", subprotocol=False)
        mute.answer_pings = False
        await mute.open()
        conns.append(mute)
        await mute.auth(f"interop-m-{nonce}", user_token(secret, f"interop-m-{nonce}"))
        for x in live:
            n0 = len(x.server_pings)
            await x.wait_until(lambda x=x, n0=n0: len(x.server_pings) >= n0 + 3, "three server pings", timeout=4.0 * interval)
        await mute.wait_closed(timeout=max(1.0, 4.0 * interval))
        require(mute.close_code == close_code(3004), f"mute connection closed with {mute.close_code}, expected {close_code(3004)}")
        for x in live:
            require(not x.closed.is_set(), f"{x.name} closed ({x.close_code} {x.close_reason!r}) although it answered pings")
            await x.ok("ping")
        counts = ", ".join(f"{x.name}: {len(x.server_pings)}" for x in live)
        return (
            f"server pings answered ({counts}; interval {interval:g} s), connections stay open; "
            f"a non-answering control connection was closed with {mute.close_code}"
        )

    await step(
        "6 server pings are answered with {type:res, seq:S, ok:{}}",
        c6,
        timeout=max(5.0, args.deadline - asyncio.get_running_loop().time() - 1.0),
    )

    # Final: no protocol deviations seen on any connection, nothing left unanswered
    bad = [f"{x.name}: {v}" for x in conns for v in x.violations]
    bad += [f"{x.name}: unexpected seq-0 response {r}" for x in conns for r in x.seq0]
    report("7 no protocol deviations (and no seq-0 error responses) on any connection", not bad, "; ".join(bad))

    for x in conns:
        await x.close()


def main() -> int:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ws", required=True, help="WebSocket URL, e.g. ws://127.0.0.1:7070/ws")
    ap.add_argument("--quic", required=True, help="QUIC HOST:PORT, e.g. 127.0.0.1:7071")
    ap.add_argument("--ca", required=True, help="cluster CA (PEM), <data-dir>/ca.pem")
    ap.add_argument("--secret", required=True, help="token secret (HS256)")
    ap.add_argument("--sni", default=None, help="QUIC server name (default: the QUIC host)")
    ap.add_argument("--timeout", type=float, default=OVERALL_TIMEOUT, help="overall timeout, s")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    VERBOSE = args.verbose

    async def top() -> None:
        args.deadline = asyncio.get_running_loop().time() + args.timeout
        await asyncio.wait_for(run(args), args.timeout)

    try:
        asyncio.run(top())
    except asyncio.TimeoutError:
        report("overall", False, f"overall timeout of {args.timeout}s exceeded")
    except KeyboardInterrupt:
        report("overall", False, "interrupted")
    failed = [r for r in RESULTS if not r[1]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed", flush=True)
    if failed or not RESULTS:
        print("FAILED: " + ", ".join(r[0] for r in failed), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What we change in py-libp2p 0.8.1's stream muxer and TCP reads, one correction per definition.

Each class here replaces a py-libp2p class by rebinding the module-level name
py-libp2p builds its objects from, so importing this module (``libp2p_patches``
does) changes every host in the process. Each docstring names the upstream
behaviour it corrects and why it hurts this network. Upgrading
py-libp2p means re-reading each one against the new release: they override
private methods.
"""

from __future__ import annotations

import struct

import trio
from libp2p.io import trio as py_trio_io
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as py_yamux
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from libp2p.transport.tcp import tcp as py_tcp

# Seconds one yamux frame (<= 64 KiB) may wait for TCP room before its connection is closed: py-libp2p
# closes a connection whose frame takes 60 s to read, and a link capped at 32 kbit/s (the testnet's
# bandwidth perturbation) drains a frame in about 16 s.
FRAME_WRITE_TIMEOUT = 60.0
MAX_FRAME_PAYLOAD = MAX_MESSAGE_SIZE - HEADER_SIZE
CREDIT_POLL = 0.01  # seconds between looks at a stream's send window while it is zero (as py-libp2p)


class WholeFrameYamux(Yamux):
    """Yamux whose frame writes are not cut short by a cancellation.

    py-libp2p writes each yamux frame through noise, which encrypts it (the
    nonce advances) and then hands it to TCP. A trio cancellation after the
    encryption, or inside a partial ``send_all``, leaves the peer holding a
    ciphertext it cannot authenticate ("Failed authentication of message");
    it drops the connection, and with it every stream and gossip link to us.
    Cancelling is how this network abandons a stream (a client's idle
    timeout, a handler whose opener left, a TA's stall timeout), so before
    this one abandoned stream could cut a peer off. Once a frame holds the
    write lock it is written whole, shielded from cancellation; one the peer
    does not drain within ``FRAME_WRITE_TIMEOUT`` is a dead connection and is
    closed, since a frame half written has broken it anyway. A cancellation
    that arrived meanwhile takes effect right after.

    py-libp2p builds its yamux connections from the module-level name
    ``muxer_multistream.Yamux`` whatever muxer class a host is given, so that
    name is rebound to this class below.
    """

    async def _write_frame(self, data: bytes) -> None:
        async with self._write_lock:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FRAME_WRITE_TIMEOUT
                await self.secured_conn.write(data)
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await self.secured_conn.close()
            raise ConnectionClosedError(f"a frame to {self.peer_id} waited {FRAME_WRITE_TIMEOUT} s", transport="tcp")
        await trio.lowlevel.checkpoint()


muxer_multistream.Yamux = WholeFrameYamux  # type: ignore[misc]


class HalfWindowCreditStream(YamuxStream):
    """A yamux stream that gives its reader's credit back once half the window is read.

    py-libp2p 0.8.1 answers nearly every read with a WINDOW_UPDATE frame: its
    "partial slack" branch credits any consumed bytes below the half-window
    threshold at once (PY_YAMUX_RELEASE_ON_READ does not reach that branch),
    and with auto-tuning on the increments even overshoot the window. On a
    token stream that is one more encrypted frame and send syscall for each
    frame read, and one more frame for the writer to parse: about a third of
    a relayed token's CPU at each end (py-spy; test:
    ``test_a_reader_gives_credit_back_per_half_window_not_per_frame``). Here,
    as go-yamux's ``sendWindowUpdate`` does, the credit owed is the window
    minus what is still buffered minus what the peer may still send; it goes
    back only once it reaches half the window (the writer still has the other
    half to send meanwhile, so a reader that reads never stalls it), with
    py-libp2p's auto-tuning growth applied when it does.

    py-libp2p's yamux connection builds its streams from the module-level name
    ``yamux.YamuxStream``, so that name is rebound to this class below.
    """

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            owed = self.target_recv_window - (self.recv_window + buffered)
            if owed < max(self.target_recv_window // 2, 1):  # not _grow_threshold: two env reads a call
                return
            self.recv_window += owed
            owed += self._apply_autotune_epoch(buffered)
        await self.send_window_update(owed, skip_lock=True)


class WholeMessageStream(HalfWindowCreditStream):
    """A yamux stream whose writes go out each whole, or reset the stream.

    py-libp2p 0.8.1 takes a stream's write lock per yamux frame, not per
    write. A write larger than the send window goes out as several frames
    with waits for credit between them, and a second task writing to the
    same stream meanwhile slips its frames in between: gossipsub does exactly
    that (its per-peer sending loop and its flush of pending messages write
    to one stream), and the peer reads a corrupt length-prefixed RPC -- two
    participants of testnet run 10 exited on one. A write that stops half
    way (cancelled, or timed out waiting for credit) left the stream open
    too, so the peer read the next message as the rest of this one. Here one
    write holds the stream until its last frame is out, and a write that
    stopped after its first frame resets the stream: the peer sees a reset,
    never a misframed message. Credit may take ``FRAME_WRITE_TIMEOUT`` to
    come, as a frame may take to drain (py-libp2p: 5 s, less than a capped
    link needs to carry half a window).
    """

    def __init__(self, stream_id: int, conn: Yamux, is_initiator: bool) -> None:
        super().__init__(stream_id, conn, is_initiator)
        self._message_lock = trio.Lock()

    async def write(self, data: bytes) -> None:
        async with self._message_lock:
            begun = False
            try:
                sent = 0
                while sent < len(data):
                    size = await self._take_send_window(len(data) - sent)
                    begun = True
                    header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, self.stream_id, size)
                    await self.conn._write_frame(header + data[sent:sent + size])  # noqa: SLF001
                    sent += size
            except BaseException:
                if begun:
                    with trio.CancelScope(shield=True):
                        await self.reset()
                raise

    async def _take_send_window(self, wanted: int) -> int:
        """Reserves up to ``wanted`` bytes (at most one frame) of the peer's credit, waiting for some."""
        with trio.move_on_after(FRAME_WRITE_TIMEOUT):
            while True:
                async with self.window_lock:
                    if self.send_closed or self.closed:
                        raise MuxedStreamError("Stream is closed for sending")
                    if self.send_window > 0:
                        size = min(self.send_window, MAX_FRAME_PAYLOAD, wanted)
                        self.send_window -= size
                        return size
                await trio.sleep(CREDIT_POLL)
        raise MuxedStreamError(f"no window update from {self.conn.peer_id} in {FRAME_WRITE_TIMEOUT} s")


py_yamux.YamuxStream = WholeMessageStream  # type: ignore[misc]


READ_AHEAD = 64 * 1024  # bytes one TCP read may take beyond what was asked


class ReadAheadTCPStream(TrioTCPStream):
    """A TCP connection read in chunks of up to ``READ_AHEAD`` bytes, served from a buffer.

    py-libp2p reads each noise message in two reads of exactly what it needs
    (the 2-byte length, then the body), each a ``recv`` system call through
    trio's socket wrapper: two per yamux frame, a quarter of a token stream
    reader's CPU (py-spy). Here one ``recv`` takes whatever has arrived, so a
    frame costs at most one and frames that arrive together share one. The
    buffer is read and refilled under the read lock, so concurrent readers
    still see the bytes in order.

    py-libp2p's TCP transport and transport manager build connections from
    the names ``tcp.TrioTCPStream`` and ``libp2p.io.trio.TrioTCPStream``, so
    both are rebound to this class below.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self._ahead = bytearray()
        self._ahead_lock = trio.Lock()

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        async with self._ahead_lock:
            if not self._ahead:
                chunk = await super().read(max(n or 0, READ_AHEAD))
                if not chunk:
                    return chunk
                self._ahead += chunk
            take = len(self._ahead) if n is None else n
            data = bytes(self._ahead[:take])
            del self._ahead[:take]
            return data


py_trio_io.TrioTCPStream = ReadAheadTCPStream  # type: ignore[misc]
py_tcp.TrioTCPStream = ReadAheadTCPStream  # type: ignore[misc]

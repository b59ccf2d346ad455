//! One client connection: a reader task that frames requests and dispatches them in order, and a
//! writer task that sends the responses in the same order.
//!
//! Limits: a frame longer than `frame_bytes_max` or with a broken header closes the connection
//! (the stream cannot be trusted after it); at most `in_flight_max` requests wait for their
//! response (then the reader stops reading: back-pressure, not an unbounded queue); a frame
//! longer than a read chunk takes its length from the shard's request memory
//! ([`crate::request_memory`]) before it is read, and holds it until its response is ready
//! (such a request runs as a task of its own, so a response queued behind one the client does
//! not read still gives its memory back), so the memory held for requests does not grow with
//! the connections; while others wait for that memory, a frame holding some must keep arriving
//! ([`FRAME_STALL`]); a frame must
//! arrive completely within `frame_timeout` once started, and an idle connection is closed after
//! `idle_timeout`.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpStream;
use skein_net::frame::{self, FrameError};
use skein_net::{ErrorCode, Part};

use crate::handlers::{self, Outgoing};
use crate::request_memory::{Acquire, Grant};
use crate::sendfile;
use crate::shard::{LocalFuture, Shard};

/// Bytes read from the socket at a time when no frame size is known yet.
/// Read size while no frame is in progress (what an idle connection holds).
const READ_CHUNK_BYTES: usize = 16 << 10;
/// Largest read of a frame in progress: the memory a frame touches grows with the bytes that
/// actually arrive, never with what its length prefix claims (a slow sender announcing 64 MiB
/// holds what it sent and one read, not 64 MiB; see `make_room`).
const FRAME_READ_MAX_BYTES: usize = 1 << 20;
/// While other frames wait for request memory, a frame that holds some must keep arriving: at
/// least [`FRAME_STALL_BYTES_MIN`] in every [`FRAME_STALL`], or its connection is closed. A
/// sender that announces a long frame and trickles it would otherwise hold its length of the
/// shard's request memory, and every long frame queued behind it, until the frame timeout
/// (30 s by default) cut it, one such sender after another.
const FRAME_STALL: Duration = Duration::from_secs(2);
const FRAME_STALL_BYTES_MIN: usize = 64 << 10;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    Closed,
    Frame(FrameError),
    Io(std::io::Error),
    IdleTimeout,
    FrameTimeout,
    /// A frame holding request memory that others wait for stopped arriving (see
    /// [`FRAME_STALL`]).
    Stalled,
    ShuttingDown,
}

/// Serves a TCP connection until the client closes it, breaks the framing, or the broker
/// stops. Record ranges in files go out with `sendfile`.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let socket = stream.as_raw_fd();
    if let Err(error) = sendfile::set_nonblocking(socket) {
        tracing::warn!(%error, "could not make a client socket non-blocking");
        return;
    }
    let (reader, writer) = stream.split();
    serve_stream(shard, TcpRequests { reader, socket }, writer, Some(socket), peer).await;
}

/// A stream of request bytes that a frame buffer is filled from.
///
/// A read appends to the buffer's spare capacity, so the memory a frame arrives in is written
/// once, by the read, and never zeroed first: with a `&mut [u8]` target (`AsyncRead`) the room
/// must be initialised before every read, and zeroing each request's bytes before the socket
/// copied them in was a memset over everything a producer sent (4.3 % of a flat-out embedded
/// produce's CPU samples, all of it in `make_room`).
pub(crate) trait RequestStream {
    /// Appends at most `max` bytes to `buffer` (whose spare capacity holds `max`); `Ok(0)` at
    /// the end of the stream. On an error the buffer's length is unspecified (the connection
    /// ends).
    async fn read_into(&mut self, buffer: &mut BytesMut, max: usize) -> std::io::Result<usize>;
}

/// How much room is zeroed for a read that must wait for the socket (see [`TcpRequests`]).
const WAIT_READ_BYTES: usize = 16 << 10;

/// A TCP connection's read half. Bytes already in the socket are taken with a non-blocking
/// `recv` straight into the buffer's spare capacity (the kernel writes memory Rust has not
/// initialised, as `std`'s `read_buf` does). Only when the socket is empty does the read go
/// through glommio, which waits for readiness on the ring: that read gets a zeroed window of
/// [`WAIT_READ_BYTES`], and the reads after it, while bytes keep coming, go straight in again.
pub(crate) struct TcpRequests<R> {
    pub reader: R,
    pub socket: RawFd,
}

impl<R: AsyncRead + Unpin> RequestStream for TcpRequests<R> {
    async fn read_into(&mut self, buffer: &mut BytesMut, max: usize) -> std::io::Result<usize> {
        let start = buffer.len();
        loop {
            let spare = buffer.spare_capacity_mut();
            let room = max.min(spare.len());
            // SAFETY: `spare` is `room` writable bytes owned by `buffer`; the kernel writes at
            // most `room` of them and reports how many, and only those are made part of the
            // buffer.
            let read =
                unsafe { libc::recv(self.socket, spare.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
            if read >= 0 {
                // SAFETY: the kernel initialised `read` bytes past the old length.
                unsafe { buffer.set_len(start + read as usize) };
                return Ok(read as usize);
            }
            let error = std::io::Error::last_os_error();
            match error.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => break,
                _ => return Err(error),
            }
        }
        buffer.resize(start + max.min(WAIT_READ_BYTES), 0);
        let read = self.reader.read(&mut buffer[start..]).await;
        buffer.truncate(start + *read.as_ref().unwrap_or(&0));
        read
    }
}

/// A QUIC stream's receiving side. A read copies what arrived straight into the buffer's spare
/// room (nothing zeroed first) with quinn's `poll_read_buf`, which takes every chunk it holds
/// (about a packet each) under one lock of the connection's state: a read carries what
/// arrived, not one packet's worth. Reading chunk by chunk (`read_chunk`, one lock and one
/// future each, then a copy) cost that per 1.2 KiB packet.
pub(crate) struct QuicRequests {
    recv: quinn::RecvStream,
}

impl QuicRequests {
    pub fn new(recv: quinn::RecvStream) -> QuicRequests {
        QuicRequests { recv }
    }
}

impl RequestStream for QuicRequests {
    async fn read_into(&mut self, buffer: &mut BytesMut, max: usize) -> std::io::Result<usize> {
        buffer.reserve(max);
        let spare = &mut buffer.spare_capacity_mut()[..max];
        let mut room = tokio::io::ReadBuf::uninit(spare);
        // Cancel-safe: quinn takes no chunk unless it returns them, and what it returned is
        // counted below before anything else can run. The stream's end reads as 0 bytes; a
        // reset after data is told by the next read (quinn keeps it).
        std::future::poll_fn(|cx| self.recv.poll_read_buf(cx, &mut room))
            .await
            .map_err(std::io::Error::other)?;
        let read = room.filled().len();
        // SAFETY: `poll_read_buf` initialised the first `read` bytes of the spare room.
        unsafe { buffer.set_len(buffer.len() + read) };
        Ok(read)
    }
}

/// Serves one ordered byte stream of request frames (a TCP connection, or one bidirectional
/// QUIC stream), answering on `writer` in request order. `socket`: the TCP socket under
/// `writer`, for `sendfile`; without it, record ranges in files are read into memory first.
pub(crate) async fn serve_stream<R, W>(
    shard: Rc<Shard>,
    mut reader: R,
    writer: W,
    socket: Option<RawFd>,
    peer: Option<SocketAddr>,
) where
    R: RequestStream,
    W: AsyncWrite + Unpin + 'static,
{
    let (sender, receiver) = local_channel::new_bounded::<LocalFuture<Outgoing>>(shard.config.in_flight_max);
    let writer_failed = Rc::new(Cell::new(false));
    let writer_task = glommio::spawn_local(write_loop(writer, socket, receiver, writer_failed.clone()));

    let end = read_loop(&shard, &mut reader, &sender, &writer_failed).await;
    match &end {
        End::Closed | End::ShuttingDown => tracing::debug!(?peer, ?end, "connection ended"),
        End::Frame(error) => tracing::warn!(?peer, %error, "closing a connection after a framing error"),
        End::Io(error) => tracing::info!(?peer, %error, "closing a connection after an I/O error"),
        other => tracing::info!(?peer, end = ?other, "closing a connection"),
    }
    drop(sender);
    writer_task.await;
}

async fn read_loop<R: RequestStream>(
    shard: &Rc<Shard>,
    reader: &mut R,
    sender: &local_channel::LocalSender<LocalFuture<Outgoing>>,
    writer_failed: &Cell<bool>,
) -> End {
    let config = &shard.config;
    // `buffer` holds what arrived of the frame in progress (and of any after it); reads append
    // to its spare capacity (see `RequestStream`).
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // When the first bytes of the frame in progress arrived: the whole frame must arrive within
    // `frame_timeout` of it, however it trickles in (slow-loris protection).
    let mut frame_started: Option<std::time::Instant> = None;
    // The request memory held by the frame in progress (the first one in `buffer`), taken once
    // its length is known if it is longer than a read chunk.
    let mut grant: Option<Grant> = None;
    // The capacity `buffer`'s allocation had when it was made, and whether a frame was taken
    // from it since.
    let mut allocation = buffer.capacity();
    let mut taken = false;
    // While `grant` is held: when the current stall window started, and `buffer`'s length then.
    let mut progress: Option<(std::time::Instant, usize)> = None;
    loop {
        // Take every whole frame already buffered.
        loop {
            match frame::request_frame_len(&buffer, config.frame_bytes_max) {
                Err(error) => return End::Frame(error),
                Ok(None) => break,
                Ok(Some(len)) => {
                    frame_started = None;
                    // A long frame that arrived whole with the bytes of the one before it
                    // takes its share now.
                    progress = None;
                    let grant = match grant.take() {
                        Some(grant) => Some(grant),
                        None if len > READ_CHUNK_BYTES => match acquire(shard, len).await {
                            Ok(grant) => Some(grant),
                            Err(end) => return end,
                        },
                        None => None,
                    };
                    let whole = buffer.split_to(len);
                    taken = true;
                    let header = match frame::decode_request_header(&whole) {
                        Ok(header) => header,
                        Err(error) => return End::Frame(error),
                    };
                    let received = std::time::Instant::now();
                    shard.metrics.request(header.api_key, whole.len());
                    let (api_key, correlation_id) = (header.api_key, header.correlation_id);
                    let pending = handlers::handle(shard, header, whole).await;
                    let handled = std::time::Instant::now();
                    let holds_memory = grant.is_some();
                    let mut pending =
                        measured(shard.clone(), api_key, correlation_id, received, handled, pending, grant);
                    if holds_memory {
                        // Its own task: the grant goes back once the response is ready, not once
                        // the writer gets to it, which could be never behind a response the client
                        // does not read (the writer sends in order).
                        pending = Box::pin(glommio::spawn_local(pending));
                    }
                    if sender.send(pending).await.is_err() {
                        return End::Closed;
                    }
                }
            }
        }
        if writer_failed.get() {
            return End::Closed;
        }
        if shard.shutting_down.get() {
            return End::ShuttingDown;
        }
        // What is left in `buffer` (the next frame's first bytes, at most a read's worth) is a
        // view of the allocation that held the frames just taken, and would keep all of it
        // alive for as long as this connection waits: for request memory, for a slow client,
        // or idle for minutes. After a long frame, move it to an allocation of its own; the
        // long frame's memory then lives only as long as its request (under its grant) and
        // its batches in the tail cache (under the cache's bound). Without this, 200
        // producers on 400 connections held 1.6 GB of frame memory that neither accounted for
        // (heaptrack: all of it from `make_room`, a broker at 2.1 GB resident with a 64 MiB
        // request budget and a 16 MiB tail cache).
        if taken && allocation > 2 * READ_CHUNK_BYTES {
            let held = buffer.split();
            buffer = BytesMut::with_capacity(READ_CHUNK_BYTES.max(held.len()));
            buffer.extend_from_slice(&held);
            allocation = buffer.capacity();
            taken = false;
        }
        // Read more: the rest of the current frame if its length is known, else a chunk.
        let filled = buffer.len();
        let frame_total = (filled >= frame::LENGTH_BYTES).then(|| {
            u32::from_le_bytes(buffer[..4].try_into().expect("4 bytes")) as usize + frame::LENGTH_BYTES
        });
        let wanted = match frame_total {
            Some(total) => total.saturating_sub(filled).clamp(READ_CHUNK_BYTES, FRAME_READ_MAX_BYTES),
            None => READ_CHUNK_BYTES,
        };
        if let Some(total) = frame_total.filter(|&total| total > READ_CHUNK_BYTES && grant.is_none()) {
            // A frame is refused before this if over `frame_bytes_max`, so `total` is what a
            // client may really send. Its clock starts once the broker is ready to read it.
            match acquire(shard, total).await {
                Ok(granted) => grant = Some(granted),
                Err(end) => return end,
            }
            frame_started = Some(std::time::Instant::now());
            progress = Some((std::time::Instant::now(), filled));
        }
        // The stall window: a new one once the last is over, if the frame kept arriving or
        // nobody waits; if not, the frame has stalled while others wait.
        if let Some((since, at)) = progress {
            if stalled(shard, since, filled - at) {
                return End::Stalled;
            }
            if since.elapsed() >= FRAME_STALL {
                progress = Some((std::time::Instant::now(), filled));
            }
        }
        let stall = progress.map(|(since, at)| (since, filled - at));
        let (timeout, idle) = if filled == 0 {
            frame_started = None;
            (config.idle_timeout, true)
        } else {
            let started = *frame_started.get_or_insert_with(std::time::Instant::now);
            let left = config.frame_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return End::FrameTimeout;
            }
            (left, false)
        };
        if let Some(fresh) = make_room(&mut buffer, wanted, frame_total) {
            allocation = fresh;
            taken = false;
        }
        match read_with_timeout(reader, &mut buffer, wanted, timeout, idle, stall, shard).await {
            Ok(0) => return End::Closed,
            Ok(_) => {}
            Err(end) => return end,
        }
    }
}

/// Makes room in `buffer`'s spare capacity for a read of `wanted` bytes after the bytes it
/// holds (what arrived of the frame in progress). When the buffer is too small it is replaced
/// by a new one and the held bytes are copied over, instead of growing it with
/// `BytesMut::resize`: the frames already taken from it are still
/// alive (in the tail cache, or a response), so growing could not reuse its memory and
/// reallocated and copied it, doubling, zeroed room included (9 % of a flat-out produce's CPU).
///
/// Once the frame's length is known (`frame_total`) the new buffer has room for the whole
/// frame and its last read (which asks for at least a chunk, and so may take the next frame's
/// first bytes): every frame gets its memory once, however long, and its bytes are copied once
/// more only for the first chunk read before the length was known. Before, a frame longer than
/// one `FRAME_READ_MAX_BYTES` read doubled its buffer with what arrived, copying it about once
/// more and faulting in each new buffer — and a producer that falls behind sends requests of
/// several MiB (`request_bytes_max`, 8 MiB by default).
///
/// The memory the broker *touches* still follows the bytes that came, never what a length
/// prefix claims: only the bytes that arrive are written, by the read itself (nothing is zeroed
/// ahead, see [`RequestStream`]; a TCP read that has to wait zeroes a 16 KiB window); the rest
/// of the capacity is address space the kernel backs with memory only when a read writes it (a buffer over glibc's mmap threshold is a fresh mapping; below
/// it, heap memory already resident or not yet touched). A slow-loris sender that announces a
/// 64 MiB frame costs its connection one read's worth of memory until the frame timeout cuts it
/// (`cli/tests/hostile.rs`).
///
/// Returns the capacity of the new buffer when it made one.
fn make_room(buffer: &mut BytesMut, wanted: usize, frame_total: Option<usize>) -> Option<usize> {
    let needed = buffer.len() + wanted;
    if buffer.capacity() >= needed {
        return None;
    }
    let target = match frame_total {
        None => needed,
        Some(total) => needed.max(total + READ_CHUNK_BYTES),
    };
    let mut fresh = BytesMut::with_capacity(target);
    fresh.extend_from_slice(buffer);
    *buffer = fresh;
    Some(target)
}

/// Whether a frame holding request memory has stalled: under [`FRAME_STALL_BYTES_MIN`]
/// `arrived` in a stall window begun `since`, once the window is over, while others wait.
fn stalled(shard: &Shard, since: std::time::Instant, arrived: usize) -> bool {
    arrived < FRAME_STALL_BYTES_MIN && since.elapsed() >= FRAME_STALL && shard.request_memory.waiting() > 0
}

/// `bytes` of the shard's request memory for a frame, waiting (and so not reading the
/// connection) while other frames hold it; checks every second whether the broker is stopping.
async fn acquire(shard: &Shard, bytes: usize) -> Result<Grant, End> {
    let mut acquire: std::pin::Pin<&mut Acquire> = std::pin::pin!(shard.request_memory.acquire(bytes));
    loop {
        match glommio::timer::timeout(Duration::from_secs(1), async { Ok(acquire.as_mut().await) }).await {
            Ok(grant) => return Ok(grant),
            Err(_) if shard.shutting_down.get() => return Err(End::ShuttingDown),
            Err(_) => {}
        }
    }
}

/// The response future, counted in the shard's metrics when it is ready (and logged with
/// `log_requests`). `grant`: the request memory its frame holds, given back then (a produce's
/// records are by then in the tail cache, under its own bound, or freed).
fn measured(
    shard: Rc<Shard>,
    api_key: u16,
    correlation_id: u32,
    received: std::time::Instant,
    handled: std::time::Instant,
    pending: LocalFuture<Outgoing>,
    grant: Option<Grant>,
) -> LocalFuture<Outgoing> {
    Box::pin(async move {
        let outgoing = pending.await;
        drop(grant);
        let elapsed = received.elapsed();
        let bytes = match &outgoing {
            Outgoing::None => 0,
            Outgoing::Frame(frame) => frame.len(),
            Outgoing::Parts(parts) => parts
                .iter()
                .map(|part| match part {
                    Part::Bytes(bytes) => bytes.len(),
                    Part::Records(records) => records.len(),
                })
                .sum(),
        };
        shard.metrics.responded(api_key, elapsed);
        shard.metrics.response_bytes(bytes);
        if shard.config.log_requests {
            tracing::info!(
                api = %crate::metrics::api_name(api_key),
                correlation_id,
                response_bytes = bytes,
                micros = elapsed.as_micros() as u64,
                // The request's own work before its response could wait (a produce: checks and
                // appends into the write buffers, waiting for room), then the wait for the
                // response (a produce: its writes; a fetch: its long poll).
                handle_micros = handled.duration_since(received).as_micros() as u64,
                "request"
            );
        }
        outgoing
    })
}

/// Reads once, giving up after `timeout`; wakes every second to notice a broker shutdown and,
/// for a frame that holds request memory (`stall`: when its stall window began and the bytes
/// that arrived in it), a stall while other frames wait (see [`FRAME_STALL`]).
async fn read_with_timeout<R: RequestStream>(
    reader: &mut R,
    buffer: &mut BytesMut,
    max: usize,
    timeout: Duration,
    idle: bool,
    stall: Option<(std::time::Instant, usize)>,
    shard: &Shard,
) -> Result<usize, End> {
    let started = std::time::Instant::now();
    let mut read = std::pin::pin!(reader.read_into(buffer, max));
    loop {
        let slice = (timeout.saturating_sub(started.elapsed())).min(Duration::from_secs(1));
        match glommio::timer::timeout(slice, async { Ok(read.as_mut().await) }).await {
            Ok(Ok(n)) => return Ok(n),
            Ok(Err(error)) => return Err(End::Io(error)),
            Err(_) => {
                if shard.shutting_down.get() {
                    return Err(End::ShuttingDown);
                }
                if stall.is_some_and(|(since, arrived)| stalled(shard, since, arrived)) {
                    return Err(End::Stalled);
                }
                if started.elapsed() >= timeout {
                    return Err(if idle { End::IdleTimeout } else { End::FrameTimeout });
                }
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    socket: Option<RawFd>,
    receiver: local_channel::LocalReceiver<LocalFuture<Outgoing>>,
    failed: Rc<Cell<bool>>,
) {
    while let Some(pending) = receiver.recv().await {
        let outgoing = pending.await;
        if failed.get() {
            continue; // keep draining so the reader is never stuck on a full queue
        }
        let result = match outgoing {
            Outgoing::None => Ok(()),
            Outgoing::Frame(bytes) => writer.write_all(&bytes).await,
            Outgoing::Parts(parts) => write_parts(&mut writer, socket, parts).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "writing a response failed; closing the connection");
            failed.set(true);
        }
    }
    let _ = writer.close().await;
}

async fn write_parts<W: AsyncWrite + Unpin>(
    writer: &mut W,
    socket: Option<RawFd>,
    parts: Vec<Part<crate::shard::Records>>,
) -> std::io::Result<()> {
    for part in parts {
        match part {
            Part::Bytes(bytes) => writer.write_all(&bytes).await?,
            Part::Records(records) => sendfile::write_records(writer, socket, records).await?,
        }
    }
    Ok(())
}

/// Answers the first request of a connection over the limit with `TooManyConnections`, then
/// closes it.
pub async fn refuse(stream: TcpStream, peer: Option<SocketAddr>) {
    tracing::warn!(?peer, "connection limit reached; refusing a connection");
    let (mut reader, mut writer) = futures::AsyncReadExt::split(stream);
    answer_too_many_connections(&mut reader, &mut writer).await;
}

/// Waits (at most [`REFUSAL_WAIT`]) for the first request header on `reader`, answers it with
/// `TooManyConnections` (correlation id 0 if none came) and closes `writer`: the refusal of a
/// connection over the limit, over TCP and on a QUIC connection's first stream alike.
pub async fn answer_too_many_connections<R, W>(reader: &mut R, writer: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; frame::REQUEST_HEADER_BYTES];
    let read =
        glommio::timer::timeout(REFUSAL_WAIT, async { Ok(reader.read_exact(&mut header).await) }).await;
    let correlation_id = match read {
        Ok(Ok(())) => u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")),
        _ => 0,
    };
    let response = frame::encode_error_response(correlation_id, ErrorCode::TooManyConnections);
    let _ = writer.write_all(&response).await;
    let _ = writer.close().await;
}

/// How long a refused connection is kept for its first request.
pub const REFUSAL_WAIT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a frame of `total` bytes the way `read_loop` does, in reads of at most `chunk`
    /// bytes, and returns how many times its buffer was replaced.
    fn allocations_for_a_frame(total: usize, chunk: usize) -> usize {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
        let mut allocations = 0;
        while buffer.len() < total {
            let filled = buffer.len();
            let wanted = if filled >= frame::LENGTH_BYTES {
                (total - filled).clamp(READ_CHUNK_BYTES, FRAME_READ_MAX_BYTES)
            } else {
                READ_CHUNK_BYTES
            };
            let before = buffer.as_ptr();
            let known = (filled >= frame::LENGTH_BYTES).then_some(total);
            make_room(&mut buffer, wanted, known);
            if buffer.as_ptr() != before {
                allocations += 1;
            }
            let most = (filled + wanted).max(total + READ_CHUNK_BYTES);
            assert!(buffer.capacity() <= most, "never more than the frame or one read ahead");
            assert!(buffer.capacity() - filled >= wanted, "room for the read");
            let arrived = wanted.min(chunk).min(total - filled);
            buffer.extend((filled..filled + arrived).map(|i| (i % 251) as u8));
        }
        let kept = buffer[..total].iter().enumerate().all(|(i, &byte)| byte == (i % 251) as u8);
        assert!(kept, "the bytes read before a new buffer was made are kept");
        allocations
    }

    #[test]
    fn a_batch_sized_frame_gets_its_buffer_once() {
        // A 256 KiB produce request: its first 16 KiB read, then one buffer for the whole frame.
        assert_eq!(allocations_for_a_frame(256 << 10, 16 << 10), 1);
        assert_eq!(allocations_for_a_frame(256 << 10, 1500), 1);
    }

    #[test]
    fn a_long_frame_gets_its_buffer_once_too() {
        // 8 MiB in 1 MiB reads: a buffer per read would copy 36 MiB, doubling about 8; one
        // buffer copies only the first 16 KiB read.
        assert_eq!(allocations_for_a_frame(8 << 20, 1 << 20), 1);
        assert_eq!(allocations_for_a_frame(64 << 20, 64 << 10), 1);
    }
}

#[cfg(test)]
mod request_stream_tests {
    use std::io::Write;

    use super::*;

    const MARK: u8 = 0xAA;

    /// A buffer of `capacity` whose spare room holds `MARK`, to see what a read wrote.
    fn marked(capacity: usize) -> BytesMut {
        let mut buffer = BytesMut::with_capacity(capacity);
        buffer.resize(capacity, MARK);
        buffer.clear();
        buffer
    }

    /// The buffer's whole capacity (every byte was initialised by `marked` or the read).
    fn all_of(buffer: &BytesMut) -> Vec<u8> {
        // SAFETY: `marked` initialised the whole capacity.
        let whole = unsafe { std::slice::from_raw_parts(buffer.as_ptr(), buffer.capacity()) };
        whole.to_vec()
    }

    #[test]
    fn a_tcp_read_writes_only_the_bytes_that_arrived() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let address = listener.local_addr().expect("address");
                let mut client = std::net::TcpStream::connect(address).expect("connect");
                let server = listener.accept().await.expect("accept");
                let socket = server.as_raw_fd();
                sendfile::set_nonblocking(socket).expect("non-blocking");
                let (reader, _writer) = futures::AsyncReadExt::split(server);
                let mut requests = TcpRequests { reader, socket };

                // Bytes already in the socket go straight in: nothing past them is written.
                client.write_all(&[7u8; 3000]).expect("write");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                let mut buffer = marked(64 << 10);
                assert_eq!(requests.read_into(&mut buffer, 64 << 10).await.expect("read"), 3000);
                assert_eq!(&buffer[..], &[7u8; 3000][..]);
                let whole = all_of(&buffer);
                assert!(whole[3000..].iter().all(|&b| b == MARK), "a read zeroed room it did not fill");

                // An empty socket: the read waits, with only its window zeroed.
                let writer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    client.write_all(&[9u8; 100]).expect("write");
                    client
                });
                let mut buffer = marked(64 << 10);
                assert_eq!(requests.read_into(&mut buffer, 64 << 10).await.expect("read"), 100);
                assert_eq!(&buffer[..], &[9u8; 100][..]);
                let whole = all_of(&buffer);
                assert!(whole[WAIT_READ_BYTES..].iter().all(|&b| b == MARK), "zeroed past the wait window");

                // Appends after what the buffer holds, at most `max`.
                let mut client = writer.join().expect("writer");
                client.write_all(&[5u8; 500]).expect("write");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                assert_eq!(requests.read_into(&mut buffer, 300).await.expect("read"), 300);
                assert_eq!(buffer.len(), 400);
                assert_eq!(&buffer[100..], &[5u8; 300][..]);

                // The end of the stream, once the rest is read.
                drop(client);
                assert_eq!(requests.read_into(&mut buffer, 4096).await.expect("read"), 200);
                assert_eq!(requests.read_into(&mut buffer, 4096).await.expect("read"), 0);
                assert_eq!(buffer.len(), 600);
            })
            .expect("executor")
            .join()
            .expect("test");
    }
}

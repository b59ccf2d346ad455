//! One connection to a broker, shared by any number of tasks: requests are pipelined and
//! matched to responses by correlation id. A writer task and a reader task own the two halves
//! of the socket, so a large request being written never stops responses from being read.
//!
//! Over TCP the halves are the socket's; over QUIC they are the two directions of one
//! bidirectional stream of a QUIC connection (the broker serves each stream as it serves a
//! TCP connection).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use skein_net::frame::{self, flags};
use skein_net::{ApiKey, ApiVersionsResponse, ErrorCode, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::{ClientError, Result};

type Pending = Arc<Mutex<Option<HashMap<u32, oneshot::Sender<Result<Bytes>>>>>>;

/// Pieces (frame parts) handed to one vectored write at most.
const WRITE_PIECES_MAX: usize = 256;

/// How long a QUIC connection stays silent before it sends a PING: one small datagram a
/// second on an idle connection, and at most about a second before a connection whose broker
/// restarted hears its reset.
pub(crate) const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The sending half of a connection.
enum Writer {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    /// The endpoint and connection stay alive with the stream.
    Quic(quinn::SendStream, quinn::Connection, quinn::Endpoint),
}

impl Writer {
    async fn write_all(&mut self, parts: &mut Vec<Bytes>) -> std::io::Result<()> {
        match self {
            Writer::Tcp(writer) => write_all_vectored(writer, parts).await,
            Writer::Quic(send, ..) => {
                send.write_all_chunks(parts).await.map_err(std::io::Error::other)?;
                parts.clear();
                Ok(())
            }
        }
    }

    async fn shutdown(&mut self) {
        match self {
            Writer::Tcp(writer) => {
                let _ = writer.shutdown().await;
            }
            Writer::Quic(send, connection, endpoint) => {
                let _ = send.finish();
                // Bounded: a broker that is gone does not hold the task.
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                connection.close(0u32.into(), b"client closed");
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            }
        }
    }
}

/// Unpredictable bytes for a first connection id (std's per-process random hash keys, and a
/// counter, through SipHash).
fn random_id() -> [u8; skein_net::quic::CID_BYTES] {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish().to_le_bytes()
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), where a steered
/// connection picks its source port: ports outside it may belong to services.
fn ephemeral_ports() -> std::ops::RangeInclusive<u16> {
    let read = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let parsed = read.and_then(|text| {
        let mut parts = text.split_whitespace().map(|part| part.parse::<u16>().ok());
        Some((parts.next()??, parts.next()??))
    });
    match parsed {
        Some((low, high)) if low <= high && low > 0 => low..=high,
        _ => 32768..=60999,
    }
}

/// How many source ports a steered connection tries before it gives up on steering.
const STEERED_PORT_TRIES: usize = 32;

/// A TCP connection to `target` from a source port that the broker's steering program maps to
/// `shard` of `shards` ([`skein_net::tcp`]), so the shard that owns the caller's partitions
/// serves it. A port in use (`EADDRINUSE`, or the 4-tuple taken: `EADDRNOTAVAIL`) is skipped
/// for the next one of the same shard; after [`STEERED_PORT_TRIES`] the connection is made from
/// a port the kernel picks (it then lands where that port steers, and is served as well).
async fn connect_tcp_steered(
    target: std::net::SocketAddr,
    shard: usize,
    shards: usize,
) -> std::io::Result<TcpStream> {
    let range = ephemeral_ports();
    let noise = random_id();
    let start = u16::from_le_bytes([noise[0], noise[1]]);
    for skip in 0..STEERED_PORT_TRIES {
        let Some(port) = skein_net::tcp::port_for_shard(shard, shards, range.clone(), start, skip) else {
            break;
        };
        let (socket, any) = match target {
            std::net::SocketAddr::V4(_) => {
                (tokio::net::TcpSocket::new_v4()?, std::net::Ipv4Addr::UNSPECIFIED.into())
            }
            std::net::SocketAddr::V6(_) => {
                (tokio::net::TcpSocket::new_v6()?, std::net::Ipv6Addr::UNSPECIFIED.into())
            }
        };
        // A port whose last connection is in TIME_WAIT is free for a connection elsewhere.
        socket.set_reuseaddr(true)?;
        let local = std::net::SocketAddr::new(any, port);
        if let Err(error) = socket.bind(local) {
            if error.kind() == std::io::ErrorKind::AddrInUse {
                continue;
            }
            return Err(error);
        }
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                continue
            }
            Err(error) => return Err(error),
        }
    }
    tracing::debug!(%target, shard, "no free source port of the shard; connecting from any port");
    TcpStream::connect(target).await
}

/// A TCP connection to `addr`: from a source port steered to `shard` (`(shard, shards)`), or
/// from any port.
async fn connect_tcp(addr: &str, shard: Option<(usize, usize)>) -> std::io::Result<TcpStream> {
    let Some((shard, shards)) = shard else { return TcpStream::connect(addr).await };
    let target = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to nothing"))
    })?;
    connect_tcp_steered(target, shard, shards).await
}

/// Opens a QUIC connection and its request stream.
/// The QUIC client settings: TLS trusting `ca_file`, and the first connection id's shard.
/// Its errors are the caller's settings, not the network: they are not worth a retry.
fn quic_client_config(
    ca_file: &std::path::Path,
    first_shard: Option<(usize, usize)>,
) -> std::result::Result<quinn::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    for cert in certs {
        roots.add(cert).map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"skein/0".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(8 << 20))
        .receive_window(quinn::VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        // A broker that dies says nothing over UDP (TCP's kernel sends a FIN for it): a
        // connection learns of the restart when its next datagram draws the new process's
        // stateless reset. A consumer's long poll sends nothing while it waits, so the
        // keep-alive bounds how long it waits on a dead connection.
        .keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    if let Some((shard, shards)) = first_shard {
        if shard >= shards || shards > 256 {
            return Err(format!(
                "first shard {shard} of {shards}: the shard must be below the count, at most 256"
            ));
        }
        config.initial_dst_cid_provider(Arc::new(move || {
            let id = skein_net::quic::steering_dcid(shard, shards, random_id());
            quinn::ConnectionId::new(&id)
        }));
    }
    Ok(config)
}

/// A client endpoint whose socket asks for [`skein_net::quic::SOCKET_BUFFER_BYTES`] of buffers,
/// as the broker's do (within `net.core.rmem_max` and `wmem_max`: a client does not force past
/// them).
fn quic_endpoint(local: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    const BUFFER_BYTES: usize = skein_net::quic::SOCKET_BUFFER_BYTES;
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        // Both families, as `quinn::Endpoint::client` does on `[::]`.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(BUFFER_BYTES);
    socket.bind(&local.into())?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), runtime)
}

async fn connect_quic(
    addr: &str,
    server_name: Option<&str>,
    ca_file: &std::path::Path,
    first_shard: Option<(usize, usize)>,
) -> Result<(Writer, quinn::RecvStream)> {
    let config = quic_client_config(ca_file, first_shard).map_err(ClientError::Transport)?;
    let connect_error = |reason: String| ClientError::Connect { addr: addr.to_owned(), reason };
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| connect_error(e.to_string()))?
        .next()
        .ok_or_else(|| connect_error(format!("{addr} resolves to nothing")))?;
    let local: std::net::SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().expect("an address")
    } else {
        "0.0.0.0:0".parse().expect("an address")
    };
    let mut endpoint = quic_endpoint(local).map_err(|e| connect_error(e.to_string()))?;
    endpoint.set_default_client_config(config);
    let host =
        addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
    let name = server_name.unwrap_or(host);
    let connection = endpoint
        .connect(target, name)
        .map_err(|e| connect_error(e.to_string()))?
        .await
        .map_err(|e| connect_error(format!("QUIC handshake: {e}")))?;
    let (send, recv) = connection.open_bi().await.map_err(|e| connect_error(e.to_string()))?;
    Ok((Writer::Quic(send, connection, endpoint), recv))
}

/// Writes every piece (and empties `parts`), with as few `writev` calls as the socket allows.
async fn write_all_vectored(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0usize;
    while first < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> =
            parts[first..].iter().take(1024).map(|part| std::io::IoSlice::new(part)).collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        while written > 0 {
            let part = &mut parts[first];
            if written >= part.len() {
                written -= part.len();
                first += 1;
            } else {
                bytes::Buf::advance(part, written);
                written = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

/// Largest response frame accepted.
const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// A pipelined connection.
#[derive(Debug)]
pub struct Connection {
    addr: String,
    /// TCP: the source port, which the broker steers by ([`skein_net::tcp`]).
    local_port: Option<u16>,
    outgoing: mpsc::Sender<Vec<Bytes>>,
    pending: Pending,
    next_correlation: AtomicU32,
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
    /// The version of each API (by key) to send, negotiated from the broker's ApiVersions
    /// answer; `None` until then (requests go at this build's newest version).
    versions: std::sync::OnceLock<Vec<Option<u16>>>,
    /// The task reading responses: stopped when the connection is dropped, so a connection
    /// given up on (a request timed out on it) does not keep its socket open while the kernel
    /// retransmits into a silent network.
    reader: tokio::task::AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Connects and starts the connection's reader and writer tasks. `shard`: `(shard, shards)`,
    /// have shard `shard` of a broker of `shards` serve the connection (over TCP by its source
    /// port, over QUIC by its first connection id; `None`: wherever it lands, or over QUIC where
    /// the transport's `first_shard` says).
    pub async fn connect(
        addr: &str,
        connect_timeout: Duration,
        request_timeout: Duration,
        in_flight_max: usize,
        transport: &crate::Transport,
        shard: Option<(usize, usize)>,
    ) -> Result<Connection> {
        let connect_error = |reason: String| ClientError::Connect { addr: addr.to_owned(), reason };
        let no_answer = |_| connect_error(format!("no answer within {connect_timeout:?}"));
        let mut local_port = None;
        let (mut reader, mut writer): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Writer) = match transport
        {
            crate::Transport::Tcp => {
                let stream = tokio::time::timeout(connect_timeout, connect_tcp(addr, shard))
                    .await
                    .map_err(no_answer)?
                    .map_err(|e| connect_error(e.to_string()))?;
                stream.set_nodelay(true).map_err(|e| connect_error(e.to_string()))?;
                local_port = stream.local_addr().ok().map(|local| local.port());
                let (reader, writer) = stream.into_split();
                (Box::new(reader), Writer::Tcp(writer))
            }
            crate::Transport::Quic { server_name, ca_file, first_shard } => {
                let (writer, reader) = tokio::time::timeout(
                    connect_timeout,
                    connect_quic(addr, server_name.as_deref(), ca_file, shard.or(*first_shard)),
                )
                .await
                .map_err(no_answer)??;
                (Box::new(reader), writer)
            }
        };
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (outgoing, mut queue) = mpsc::channel::<Vec<Bytes>>(1024);

        let writer_pending = pending.clone();
        tokio::spawn(async move {
            // Frames waiting together go out in one vectored write (each frame is pieces
            // already: a produce request's batches are never copied into it).
            let mut parts: Vec<Bytes> = Vec::new();
            while let Some(frame) = queue.recv().await {
                parts.extend(frame);
                while parts.len() < WRITE_PIECES_MAX {
                    match queue.try_recv() {
                        Ok(frame) => parts.extend(frame),
                        Err(_) => break,
                    }
                }
                if let Err(error) = writer.write_all(&mut parts).await {
                    fail_all(&writer_pending, ClientError::ConnectionLost(error.to_string()));
                    return;
                }
            }
            writer.shutdown().await;
        });

        let reader_pending = pending.clone();
        let reader = tokio::spawn(async move {
            let error = read_responses(&mut reader, &reader_pending).await;
            fail_all(&reader_pending, error);
        })
        .abort_handle();

        Ok(Connection {
            addr: addr.to_owned(),
            local_port,
            outgoing,
            pending,
            next_correlation: AtomicU32::new(1),
            in_flight: Arc::new(Semaphore::new(in_flight_max)),
            request_timeout,
            versions: std::sync::OnceLock::new(),
            reader,
        })
    }

    /// Records the versions the broker speaks (its ApiVersions answer): from now on each
    /// request goes at the highest version both sides speak.
    pub fn set_versions(&self, broker: &ApiVersionsResponse) {
        let table = ApiKey::ALL
            .iter()
            .map(|api| broker.versions_of(*api).and_then(|theirs| api.negotiate(theirs)))
            .collect();
        let _ = self.versions.set(table);
    }

    /// The version `api` goes at on this connection; an error if the broker speaks no version
    /// of it that this client does.
    pub fn version(&self, api: ApiKey) -> Result<u16> {
        match self.versions.get() {
            None => Ok(api.versions().1),
            Some(table) => table[api as usize].ok_or_else(|| {
                ClientError::broker(
                    ErrorCode::UnsupportedVersion,
                    format!("the broker at {} speaks no version of {api:?} that this client does", self.addr),
                )
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Over TCP, the shard of a broker of `shards` that serves this connection: the one its
    /// source port steers to ([`skein_net::tcp::port_shard`]). `None` over QUIC.
    pub fn tcp_shard(&self, shards: usize) -> Option<usize> {
        self.local_port.map(|port| skein_net::tcp::port_shard(port, shards))
    }

    /// Whether the connection broke (its tasks ended).
    pub fn is_closed(&self) -> bool {
        self.outgoing.is_closed() || self.pending.lock().expect("not poisoned").is_none()
    }

    /// Sends a request and returns the response body. A frame-level error becomes
    /// [`ClientError::Broker`].
    pub async fn request(&self, request: &Request<Bytes>) -> Result<Bytes> {
        self.submit(request).await?.await
    }

    /// Queues a request on the connection and returns the future of its response. Requests are
    /// written in the order `submit` is called, which the broker keeps when it applies them.
    pub async fn submit(&self, request: &Request<Bytes>) -> Result<ResponseFuture> {
        self.submit_at(request, self.version(request.api_key())?).await
    }

    /// [`Connection::submit`] at a chosen version of the request's API (the handshake).
    pub async fn submit_at(&self, request: &Request<Bytes>, version: u16) -> Result<ResponseFuture> {
        let permit = self.in_flight.clone().acquire_owned().await.map_err(|_| ClientError::Closed)?;
        let correlation = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            let Some(map) = pending.as_mut() else {
                return Err(ClientError::ConnectionLost("connection closed".into()));
            };
            map.insert(correlation, sender);
        }
        let frame = request.to_frame_parts(correlation, 0, version);
        if self.outgoing.send(frame).await.is_err() {
            self.forget(correlation);
            return Err(ClientError::ConnectionLost("connection closed".into()));
        }
        // A fetch may wait at the broker for up to its `max_wait_ms` before it is answered: its
        // timeout starts after that.
        let timeout = match request {
            Request::Fetch(fetch) => self.request_timeout + Duration::from_millis(fetch.max_wait_ms.into()),
            _ => self.request_timeout,
        };
        Ok(ResponseFuture {
            receiver,
            timeout: Box::pin(tokio::time::sleep(timeout)),
            request_timeout: timeout,
            pending: self.pending.clone(),
            correlation,
            _permit: permit,
        })
    }

    /// Sends a request that gets no response (produce with `acks=0`).
    pub async fn send_only(&self, request: &Request<Bytes>) -> Result<()> {
        let correlation = self.next_correlation.fetch_add(1, Ordering::Relaxed);
        let frame = request.to_frame_parts(correlation, flags::NO_RESPONSE, self.version(request.api_key())?);
        self.outgoing.send(frame).await.map_err(|_| ClientError::ConnectionLost("connection closed".into()))
    }

    fn forget(&self, correlation: u32) {
        if let Some(map) = self.pending.lock().expect("not poisoned").as_mut() {
            map.remove(&correlation);
        }
    }
}

/// The response to a submitted request.
pub struct ResponseFuture {
    receiver: oneshot::Receiver<Result<Bytes>>,
    timeout: std::pin::Pin<Box<tokio::time::Sleep>>,
    request_timeout: Duration,
    pending: Pending,
    correlation: u32,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Bytes>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Bytes>> {
        use std::task::Poll;
        if let Poll::Ready(result) = std::pin::Pin::new(&mut self.receiver).poll(cx) {
            return Poll::Ready(
                result.unwrap_or(Err(ClientError::ConnectionLost("connection closed".into()))),
            );
        }
        if self.timeout.as_mut().poll(cx).is_ready() {
            // No answer in time: the connection is given up, as Kafka's client does, and every
            // other request on it fails as on a lost connection (to be retried on a new one).
            // Kept, a connection into a silent network (a partition, a peer gone without a
            // reset) would take every retry into the same silence until the kernel gave up on
            // it, minutes later, and after a long partition TCP's backed-off retransmissions
            // would resume it only long after a new connection could have been made.
            if let Some(map) = self.pending.lock().expect("not poisoned").as_mut() {
                map.remove(&self.correlation);
            }
            let reason =
                format!("no answer to a request within {:?}: connection given up", self.request_timeout);
            fail_all(&self.pending, ClientError::ConnectionLost(reason));
            return Poll::Ready(Err(ClientError::Timeout(self.request_timeout)));
        }
        Poll::Pending
    }
}

fn fail_all(pending: &Pending, error: ClientError) {
    let waiting = pending.lock().expect("not poisoned").take();
    for (_, sender) in waiting.into_iter().flatten() {
        let _ = sender.send(Err(error.clone()));
    }
}

async fn read_responses<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, pending: &Pending) -> ClientError {
    let mut buffer = BytesMut::with_capacity(64 << 10);
    loop {
        loop {
            match frame::response_frame_len(&buffer, RESPONSE_BYTES_MAX) {
                Err(error) => return ClientError::Protocol(error.to_string()),
                Ok(None) => break,
                Ok(Some(len)) => {
                    let whole = buffer.split_to(len).freeze();
                    let header = frame::decode_response_header(&whole);
                    let sender = pending
                        .lock()
                        .expect("not poisoned")
                        .as_mut()
                        .and_then(|map| map.remove(&header.correlation_id));
                    let Some(sender) = sender else { continue };
                    let result = match ErrorCode::from_u16(header.error) {
                        ErrorCode::None => Ok(whole.slice(frame::RESPONSE_HEADER_BYTES..)),
                        code => Err(ClientError::broker(code, "request refused")),
                    };
                    let _ = sender.send(result);
                }
            }
        }
        // Room for the rest of the frame being read (its length is known once 4 bytes are in),
        // at once: growing a large response 64 KiB at a time copied it over and over.
        let wanted = match buffer.len() {
            n if n >= frame::LENGTH_BYTES => {
                let length = u32::from_le_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
                (length + frame::LENGTH_BYTES).min(RESPONSE_BYTES_MAX).saturating_sub(n).max(16 << 10)
            }
            _ => 64 << 10,
        };
        if buffer.capacity() - buffer.len() < wanted {
            buffer.reserve(wanted);
        }
        match reader.read_buf(&mut buffer).await {
            Ok(0) => return ClientError::ConnectionLost("the broker closed the connection".into()),
            Ok(_) => {}
            Err(error) => return ClientError::ConnectionLost(error.to_string()),
        }
    }
}

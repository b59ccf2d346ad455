//! `skein-bench ceiling`: the most any broker could ingest on this machine. Bytes sent over
//! loopback into a glommio executor (pinned to CPU 0, as a broker shard) that writes them with
//! O_DIRECT into a file of the data directory: no records, no CRC, no offsets, no copy beyond
//! the socket's own (the bytes are received straight into the aligned buffers the writes take).
//! A produce row is then compared with the limit that includes the disk it writes to, not only
//! with the network (iperf3), which on a small machine shares its cores with that disk's I/O.
//!
//! Each round sends `bytes` on one connection from a thread pinned to the last CPU, along one of
//! eight paths, the rounds alternating (a noisy minute hits all of them):
//!
//! | path | the sender | the receiver |
//! |---|---|---|
//! | `disk` | none | the executor writes `bytes` of its own buffers, 4 writes in flight (fio's write) |
//! | `tcp` | blocking writes of 1 MiB | reads into 1 MiB DMA buffers, drops them |
//! | `tcp_disk` | the same | the same, then writes each buffer, up to 4 writes in flight |
//! | `quic` | quinn on pinned tokio, 1 MiB chunks | quinn on the shard's glommio driver, reads into 1 MiB buffers |
//! | `quic_disk` | the same | the same, then writes as `tcp_disk` |
//!
//! and three the other way, what a catch-up read costs at least (a consumer's way out):
//!
//! | path | the executor | the receiver (a thread on the last CPU) |
//! |---|---|---|
//! | `read` | reads a file it wrote first (untimed) with O_DIRECT, 1 MiB, 4 in flight (fio's read) | none |
//! | `tcp_out` | sends 1 MiB from one buffer over and over | blocking reads into 1 MiB, dropped |
//! | `read_tcp` | reads as `read` and sends each buffer as it completes | the same |
//!
//! The disk paths write a file allocated up front for the round (as fio does) and remove it
//! after. The figure is the bytes over the time from the connection's start to the receiver's
//! answer, sent once its last write completed.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::AsyncReadExt;
use futures::AsyncWriteExt;
use glommio::io::{DmaBuffer, DmaFile};
use serde::Serialize;

use crate::quic_bulk;

/// Bytes per read target and per write (fio's `--bs=1M`).
const CHUNK: usize = 1 << 20;
/// Writes in flight (fio's `--iodepth=4`; 16 measured no faster here, 2026-12-05).
const DEPTH: u64 = 4;
const TIME_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CeilingPath {
    Disk,
    Tcp,
    TcpDisk,
    Quic,
    QuicDisk,
    Read,
    TcpOut,
    ReadTcp,
}

impl CeilingPath {
    const ALL: [CeilingPath; 8] = [
        CeilingPath::Disk,
        CeilingPath::Tcp,
        CeilingPath::TcpDisk,
        CeilingPath::Quic,
        CeilingPath::QuicDisk,
        CeilingPath::Read,
        CeilingPath::TcpOut,
        CeilingPath::ReadTcp,
    ];

    /// The round writes into a file as it receives.
    fn disk(self) -> bool {
        matches!(self, CeilingPath::TcpDisk | CeilingPath::QuicDisk)
    }

    /// The round reads a file it wrote first (untimed).
    fn reads(self) -> bool {
        matches!(self, CeilingPath::Read | CeilingPath::ReadTcp)
    }

    /// The executor sends to a receiver thread.
    fn outbound(self) -> bool {
        matches!(self, CeilingPath::TcpOut | CeilingPath::ReadTcp)
    }
}

#[derive(Debug, Clone)]
pub struct CeilingOptions {
    /// Bytes per round (rounded down to whole MiB).
    pub bytes: u64,
    pub rounds: usize,
    /// Where the disk rounds write their file.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingRound {
    pub path: CeilingPath,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    pub git_commit: String,
    pub bytes: u64,
    pub data_dir: PathBuf,
    pub rounds: Vec<CeilingRound>,
    /// Medians of each path's rounds.
    pub disk_mib_per_s: f64,
    pub tcp_mib_per_s: f64,
    pub tcp_disk_mib_per_s: f64,
    pub quic_mib_per_s: f64,
    pub quic_disk_mib_per_s: f64,
    /// The way out (what a consumer's catch-up read costs at least).
    pub read_mib_per_s: f64,
    pub tcp_out_mib_per_s: f64,
    pub read_tcp_mib_per_s: f64,
}

/// The O_DIRECT side of a disk round: full buffers written in order at increasing positions,
/// at most [`DEPTH`] at once.
struct DiskSink {
    file: Rc<DmaFile>,
    position: u64,
    slots: Rc<glommio::sync::Semaphore>,
    error: Rc<RefCell<Option<String>>>,
}

impl DiskSink {
    async fn create(path: &Path, bytes: u64) -> Result<DiskSink, String> {
        // Read and write, as the broker opens its segments (glommio probes a write-only file's
        // device for polled I/O with a read, which fails with EBADF and logs an error).
        let file = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(path)
            .await
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        // Allocated up front as fio does (no allocation, or keeping the size, measured the
        // same here, 2026-12-05).
        file.pre_allocate(bytes, false).await.map_err(|e| format!("allocating {}: {e}", path.display()))?;
        Ok(DiskSink {
            file: Rc::new(file),
            position: 0,
            slots: Rc::new(glommio::sync::Semaphore::new(DEPTH)),
            error: Rc::new(RefCell::new(None)),
        })
    }

    /// Queues the write of a full buffer (waits while [`DEPTH`] are in flight).
    async fn write(&mut self, buffer: DmaBuffer) -> Result<(), String> {
        if let Some(error) = self.error.borrow().clone() {
            return Err(error);
        }
        let permit = self.slots.acquire_static_permit(1).await.map_err(|e| e.to_string())?;
        let (file, error, position) = (self.file.clone(), self.error.clone(), self.position);
        self.position += buffer.len() as u64;
        glommio::spawn_local(async move {
            let expected = buffer.len();
            match file.write_at(buffer, position).await {
                Ok(written) if written == expected => {}
                Ok(written) => *error.borrow_mut() = Some(format!("a short write: {written} of {expected}")),
                Err(e) => *error.borrow_mut() = Some(format!("writing: {e}")),
            }
            drop(permit);
        })
        .detach();
        Ok(())
    }

    /// Waits for every write, then closes and removes the file.
    async fn finish(self) -> Result<(), String> {
        self.finish_as(true).await
    }

    /// Waits for every write, then closes the file, removing it if `remove`.
    async fn finish_as(self, remove: bool) -> Result<(), String> {
        self.slots.acquire(DEPTH).await.map_err(|e| e.to_string())?;
        if let Some(error) = self.error.borrow().clone() {
            return Err(error);
        }
        if remove {
            self.file.remove().await.map_err(|e| format!("removing the file: {e}"))?;
        }
        let file = Rc::try_unwrap(self.file).map_err(|_| "the file is still shared")?;
        file.close().await.map_err(|e| format!("closing the file: {e}"))
    }
}

/// Writes `bytes` of the executor's buffers (what they hold does not matter: nothing checks
/// it) into a new file at `path` with O_DIRECT, 4 writes in flight, and closes it: the `disk`
/// round, timed, and a read round's file, untimed (none of it is then in the page cache).
async fn write_file(path: &Path, bytes: u64) -> Result<(), String> {
    let mut sink = DiskSink::create(path, bytes).await?;
    for _ in 0..bytes / CHUNK as u64 {
        sink.write(glommio::allocate_dma_buffer(CHUNK)).await?;
    }
    sink.finish_as(false).await
}

/// Reads the file's `bytes` in order with O_DIRECT, [`CHUNK`] at a time and [`DEPTH`] reads in
/// flight (fio's read), sending each to `out` if given, straight from the read's buffer.
async fn read_out(
    path: &Path,
    bytes: u64,
    mut out: Option<&mut glommio::net::TcpStream>,
) -> Result<(), String> {
    let file = Rc::new(DmaFile::open(path).await.map_err(|e| format!("opening {}: {e}", path.display()))?);
    let chunks = bytes / CHUNK as u64;
    let mut pending = std::collections::VecDeque::new();
    let mut issued = 0u64;
    for _ in 0..chunks {
        while issued < chunks && pending.len() < DEPTH as usize {
            let (file, position) = (file.clone(), issued * CHUNK as u64);
            pending
                .push_back(glommio::spawn_local(async move { file.read_at_aligned(position, CHUNK).await }));
            issued += 1;
        }
        let read =
            pending.pop_front().expect("a read in flight").await.map_err(|e| format!("reading: {e}"))?;
        if read.len() != CHUNK {
            return Err(format!("a short read: {} of {CHUNK}", read.len()));
        }
        if let Some(stream) = out.as_deref_mut() {
            stream.write_all(&read).await.map_err(|e| format!("send: {e}"))?;
        }
    }
    let file = Rc::try_unwrap(file).map_err(|_| "the file is still shared")?;
    file.close().await.map_err(|e| format!("closing the file: {e}"))
}

/// The receiving side of an outbound round, on the last CPU: the bytes read until the stream
/// ended and the seconds from the connection's acceptance.
fn receive_tcp(listener: std::net::TcpListener) -> Result<(u64, f64), String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    quic_bulk::pin_to(cpus - 1);
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + TIME_LIMIT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    let started = Instant::now();
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(TIME_LIMIT)).map_err(|e| e.to_string())?;
    let mut buffer = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buffer).map_err(|e| format!("read: {e}"))? {
            0 => break,
            read => total += read as u64,
        }
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

/// A stream the receiver reads whole buffers from.
trait Fill {
    /// Fills `buffer`; the bytes read (fewer than its length only at the end of the stream).
    async fn fill(&mut self, buffer: &mut DmaBuffer) -> Result<usize, String>;
}

impl Fill for glommio::net::TcpStream {
    /// Takes what the socket holds with a non-blocking `recv` and waits through glommio only
    /// when it is empty, as the broker's connections do.
    async fn fill(&mut self, buffer: &mut DmaBuffer) -> Result<usize, String> {
        let mut filled = 0;
        let len = buffer.len();
        while filled < len {
            let target = &mut buffer.as_bytes_mut()[filled..];
            // SAFETY: `target` is writable memory of `target.len()` bytes.
            let read = unsafe {
                libc::recv(self.as_raw_fd(), target.as_mut_ptr().cast(), target.len(), libc::MSG_DONTWAIT)
            };
            let read = if read >= 0 {
                read as usize
            } else if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                self.read(target).await.map_err(|e| format!("read: {e}"))?
            } else {
                return Err(format!("recv: {}", std::io::Error::last_os_error()));
            };
            if read == 0 {
                break;
            }
            filled += read;
        }
        Ok(filled)
    }
}

impl Fill for quinn::RecvStream {
    async fn fill(&mut self, buffer: &mut DmaBuffer) -> Result<usize, String> {
        let mut filled = 0;
        let len = buffer.len();
        while filled < len {
            match self.read(&mut buffer.as_bytes_mut()[filled..]).await.map_err(|e| format!("read: {e}"))? {
                Some(read) => filled += read,
                None => break,
            }
        }
        Ok(filled)
    }
}

/// Receives until the stream ends, writing every full buffer when `sink` is given; the bytes
/// received. The streams send whole MiB, so the last buffer is full or empty.
async fn receive(source: &mut impl Fill, mut sink: Option<DiskSink>) -> Result<u64, String> {
    let mut total = 0u64;
    let mut spare = None;
    loop {
        let mut buffer = spare.take().unwrap_or_else(|| glommio::allocate_dma_buffer(CHUNK));
        let read = source.fill(&mut buffer).await?;
        total += read as u64;
        if read < CHUNK {
            if read != 0 {
                return Err(format!("the stream ended {read} bytes into a MiB"));
            }
            break;
        }
        match &mut sink {
            Some(sink) => sink.write(buffer).await?,
            None => spare = Some(buffer),
        }
    }
    if let Some(sink) = sink {
        sink.finish().await?;
    }
    Ok(total)
}

async fn serve_tcp(listener: glommio::net::TcpListener, sink: Option<DiskSink>) -> Result<u64, String> {
    let mut stream = listener.accept().await.map_err(|e| format!("accept: {e}"))?;
    let total = receive(&mut stream, sink).await?;
    stream.write_all(&total.to_le_bytes()).await.map_err(|e| format!("answer: {e}"))?;
    stream.close().await.map_err(|e| format!("close: {e}"))?;
    Ok(total)
}

async fn serve_quic(endpoint: quinn::Endpoint, sink: Option<DiskSink>) -> Result<u64, String> {
    let incoming = endpoint.accept().await.ok_or("the endpoint closed")?;
    let connection = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let mut recv = connection.accept_uni().await.map_err(|e| format!("accept stream: {e}"))?;
    let total = receive(&mut recv, sink).await?;
    let mut done = connection.open_uni().await.map_err(|e| format!("answer: {e}"))?;
    done.write_all(&total.to_le_bytes()).await.map_err(|e| format!("answer: {e}"))?;
    done.finish().map_err(|e| format!("answer: {e}"))?;
    connection.closed().await;
    Ok(total)
}

/// The sending side of a TCP round: the bytes the receiver answered and the seconds from the
/// connection's start to its answer.
fn send_tcp(address: SocketAddr, bytes: u64) -> Result<(u64, f64), String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                quic_bulk::pin_to(cpus - 1);
                let started = Instant::now();
                let mut stream = TcpStream::connect(address).map_err(|e| format!("connect: {e}"))?;
                stream.set_read_timeout(Some(TIME_LIMIT)).map_err(|e| e.to_string())?;
                stream.set_write_timeout(Some(TIME_LIMIT)).map_err(|e| e.to_string())?;
                let chunk = vec![0x5au8; CHUNK];
                for _ in 0..bytes / CHUNK as u64 {
                    stream.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
                }
                stream.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
                let mut answer = [0u8; 8];
                stream.read_exact(&mut answer).map_err(|e| format!("answer: {e}"))?;
                Ok((u64::from_le_bytes(answer), started.elapsed().as_secs_f64()))
            })
            .join()
            .map_err(|_| "the sender panicked".to_owned())?
    })
}

/// One round on `path`: the bytes received and the seconds.
/// The executor's part of a round on `path`: the bytes it received (or wrote, read, sent) and,
/// where it keeps the clock itself, the seconds. It sends the address a sender connects to
/// (or a placeholder when nobody connects) once it is ready.
async fn executor_side(
    path: CeilingPath,
    file: &Path,
    bytes: u64,
    address_tx: std::sync::mpsc::Sender<SocketAddr>,
    receiver: Option<SocketAddr>,
    server_config: quinn::ServerConfig,
) -> Result<(u64, Option<f64>), String> {
    let nobody = SocketAddr::from(([127, 0, 0, 1], 0));
    match path {
        CeilingPath::Disk => {
            let _ = address_tx.send(nobody);
            let started = Instant::now();
            write_file(file, bytes).await?;
            let seconds = started.elapsed().as_secs_f64();
            std::fs::remove_file(file).map_err(|e| format!("removing the file: {e}"))?;
            Ok((bytes, Some(seconds)))
        }
        CeilingPath::Read | CeilingPath::TcpOut | CeilingPath::ReadTcp => {
            let _ = address_tx.send(nobody);
            if path.reads() {
                write_file(file, bytes).await?;
            }
            let started = Instant::now();
            match receiver {
                None => read_out(file, bytes, None).await?,
                Some(address) => {
                    let mut stream = glommio::net::TcpStream::connect(address)
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let _ = stream.set_nodelay(true);
                    if path.reads() {
                        read_out(file, bytes, Some(&mut stream)).await?;
                    } else {
                        let buffer = glommio::allocate_dma_buffer(CHUNK);
                        for _ in 0..bytes / CHUNK as u64 {
                            stream.write_all(buffer.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
                        }
                    }
                    stream.close().await.map_err(|e| format!("close: {e}"))?;
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            if path.reads() {
                std::fs::remove_file(file).map_err(|e| format!("removing the file: {e}"))?;
            }
            Ok((bytes, Some(seconds)))
        }
        CeilingPath::Tcp | CeilingPath::TcpDisk | CeilingPath::Quic | CeilingPath::QuicDisk => {
            let sink = match path.disk() {
                true => Some(DiskSink::create(file, bytes).await?),
                false => None,
            };
            if matches!(path, CeilingPath::Tcp | CeilingPath::TcpDisk) {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                let _ = address_tx.send(listener.local_addr().map_err(|e| e.to_string())?);
                Ok((serve_tcp(listener, sink).await?, None))
            } else {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                let _ = address_tx.send(socket.local_addr().map_err(|e| e.to_string())?);
                let endpoint = quic_bulk::server_endpoint(
                    server_config,
                    socket,
                    Arc::new(skein_broker::quic_runtime::ShardRuntime),
                )?;
                Ok((serve_quic(endpoint, sink).await?, None))
            }
        }
    }
}

fn round(
    path: CeilingPath,
    options: &CeilingOptions,
    cert: &rcgen::CertifiedKey,
    index: usize,
) -> Result<(u64, f64), String> {
    let bytes = options.bytes / CHUNK as u64 * CHUNK as u64;
    let file = options.data_dir.join(format!("skein-ceiling-{}-{index}.dat", std::process::id()));
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let server_config = quic_bulk::server_config(cert);
    // Outbound rounds: the executor connects to a receiver thread's listener.
    let outbound = match path.outbound() {
        true => Some(std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?),
        false => None,
    };
    let receiver_address = match &outbound {
        Some(listener) => Some(listener.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let data_dir = options.data_dir.clone();
    let server = std::thread::spawn(move || -> Result<(u64, Option<f64>), String> {
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(0))
            .make()
            .map_err(|e| e.to_string())?;
        executor.run(async move {
            let work = async {
                // As a broker shard does first: glommio's polled-I/O probe, fooled by a new
                // empty file, would fail every later O_DIRECT read (skein_storage's docs).
                skein_storage::prime_executor(&data_dir).await.map_err(|e| e.to_string())?;
                executor_side(path, &file, bytes, address_tx, receiver_address, server_config).await
            };
            let result = glommio::timer::timeout(TIME_LIMIT, async { Ok(work.await) })
                .await
                .map_err(|_| "the receiver ran past its time limit".to_owned())?;
            if result.is_err() {
                let _ = std::fs::remove_file(&file);
            }
            result
        })
    });
    let address = match address_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(address) => address,
        Err(_) => {
            return Err(server
                .join()
                .map_err(|_| "the receiver panicked".to_owned())?
                .err()
                .unwrap_or_default())
        }
    };
    let receiver = outbound.map(|listener| std::thread::spawn(move || receive_tcp(listener)));
    let sent = match path {
        // The executor wrote or read without a peer, or sent, and timed itself.
        CeilingPath::Disk | CeilingPath::Read => Ok((bytes, 0.0)),
        CeilingPath::TcpOut | CeilingPath::ReadTcp => receiver
            .expect("an outbound round has a receiver")
            .join()
            .map_err(|_| "the receiver panicked".to_owned())?,
        CeilingPath::Tcp | CeilingPath::TcpDisk => send_tcp(address, bytes),
        CeilingPath::Quic | CeilingPath::QuicDisk => quic_bulk::send_all(address, cert, bytes, 1),
    };
    let (received, own_seconds) = server.join().map_err(|_| "the receiver panicked".to_owned())??;
    let (answered, seconds) = sent?;
    // Outbound rounds end when the receiver has every byte: its clock; the others, the
    // executor's own where it kept one, else the sender's.
    let seconds = if path.outbound() { seconds } else { own_seconds.unwrap_or(seconds) };
    if received != bytes || answered != bytes {
        return Err(format!("{path:?}: received {received} of {bytes} bytes (answered {answered})"));
    }
    Ok((received, seconds))
}

pub fn run(options: CeilingOptions, git_commit: String) -> Result<CeilingReport, String> {
    if options.bytes < CHUNK as u64 {
        return Err("ceiling: send at least 1 MiB a round".into());
    }
    let free = skein_storage::free_bytes(&options.data_dir)
        .map_err(|e| format!("statvfs {}: {e}", options.data_dir.display()))?;
    // One round's file at a time, and room to spare for whoever else writes there.
    if free < options.bytes + (1 << 30) {
        return Err(format!(
            "{} has {} MiB free; a round writes {} MiB (and keeps 1 GiB free)",
            options.data_dir.display(),
            free >> 20,
            options.bytes >> 20
        ));
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(|e| e.to_string())?;
    let mut rounds = Vec::new();
    for index in 0..options.rounds.max(1) * CeilingPath::ALL.len() {
        let path = CeilingPath::ALL[index % CeilingPath::ALL.len()];
        let (bytes, seconds) = round(path, &options, &cert, index)?;
        rounds.push(CeilingRound { path, bytes, seconds, mib_per_s: bytes as f64 / 1048576.0 / seconds });
    }
    let of =
        |path| quic_bulk::median(rounds.iter().filter(|r| r.path == path).map(|r| r.mib_per_s).collect());
    Ok(CeilingReport {
        git_commit,
        bytes: options.bytes,
        data_dir: options.data_dir.clone(),
        disk_mib_per_s: of(CeilingPath::Disk),
        tcp_mib_per_s: of(CeilingPath::Tcp),
        tcp_disk_mib_per_s: of(CeilingPath::TcpDisk),
        quic_mib_per_s: of(CeilingPath::Quic),
        quic_disk_mib_per_s: of(CeilingPath::QuicDisk),
        read_mib_per_s: of(CeilingPath::Read),
        tcp_out_mib_per_s: of(CeilingPath::TcpOut),
        read_tcp_mib_per_s: of(CeilingPath::ReadTcp),
        rounds,
    })
}

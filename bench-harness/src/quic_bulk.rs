//! `skein-bench quic-bulk`: the gate of DESIGN-CLUSTER.md §8 — quinn driven by a broker shard's
//! glommio executor ([`skein_broker::quic_runtime::ShardRuntime`]) next to quinn on a pinned
//! tokio current-thread runtime (quinn's own runtime), same settings, same run.
//!
//! Each round: a server endpoint on one runtime, pinned to CPU 0, accepts one connection and
//! reads `streams` unidirectional streams to their end, counting bytes; a client endpoint on a
//! tokio current-thread runtime pinned to the last CPU writes `bytes / streams` on each stream
//! from one reused buffer. The figure is the bytes the server received over the time from the
//! first stream opened to the server's "all received" answer. Both servers use the same
//! self-signed certificate and transport settings (windows large enough not to be the limit on
//! loopback). The rounds alternate (glommio, tokio, glommio, …) so a noisy minute hits both.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Which runtime drives the server endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRuntime {
    Glommio,
    Tokio,
}

#[derive(Debug, Clone)]
pub struct QuicBulkOptions {
    pub bytes: u64,
    pub streams: usize,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub runtime: ServerRuntime,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuicBulkReport {
    pub git_commit: String,
    pub bytes: u64,
    pub streams: usize,
    pub rounds: Vec<Round>,
    /// Median of each runtime's rounds.
    pub glommio_mib_per_s: f64,
    pub tokio_mib_per_s: f64,
    /// glommio / tokio; the design's gate is ≥ 0.8.
    pub ratio: f64,
}

const TIME_LIMIT: Duration = Duration::from_secs(120);

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    Arc::new(transport)
}

pub(crate) fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, applied to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Reads every stream of the first connection to its end; the bytes received.
async fn serve(endpoint: quinn::Endpoint, streams: usize) -> Result<u64, String> {
    let incoming = endpoint.accept().await.ok_or("the endpoint closed")?;
    let connection = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let mut total = 0u64;
    let mut buffer = vec![0u8; 1 << 20];
    for _ in 0..streams {
        let mut recv = connection.accept_uni().await.map_err(|e| format!("accept stream: {e}"))?;
        while let Some(n) = recv.read(&mut buffer).await.map_err(|e| format!("read: {e}"))? {
            total += n as u64;
        }
    }
    let mut done = connection.open_uni().await.map_err(|e| format!("answer: {e}"))?;
    done.write_all(&total.to_le_bytes()).await.map_err(|e| format!("answer: {e}"))?;
    done.finish().map_err(|e| format!("answer: {e}"))?;
    // Until the client has the answer and closes.
    connection.closed().await;
    Ok(total)
}

pub(crate) fn server_config(cert: &rcgen::CertifiedKey) -> quinn::ServerConfig {
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
    let mut config = quinn::ServerConfig::with_single_cert(vec![cert.cert.der().clone()], key.into())
        .expect("a valid self-signed certificate");
    config.transport_config(transport());
    config
}

pub(crate) fn server_endpoint(
    config: quinn::ServerConfig,
    socket: UdpSocket,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint, String> {
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)
        .map_err(|e| e.to_string())
}

fn current_thread() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

fn start_server(
    runtime: ServerRuntime,
    config: quinn::ServerConfig,
    streams: usize,
) -> Result<(SocketAddr, std::thread::JoinHandle<Result<u64, String>>), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let address = socket.local_addr().map_err(|e| e.to_string())?;
    let handle = std::thread::spawn(move || -> Result<u64, String> {
        match runtime {
            ServerRuntime::Glommio => {
                let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(0))
                    .make()
                    .map_err(|e| e.to_string())?;
                executor.run(async move {
                    let endpoint =
                        server_endpoint(config, socket, Arc::new(skein_broker::quic_runtime::ShardRuntime))?;
                    glommio::timer::timeout(TIME_LIMIT, async { Ok(serve(endpoint, streams).await) })
                        .await
                        .map_err(|_| "the glommio server ran past its time limit".to_owned())?
                })
            }
            ServerRuntime::Tokio => {
                pin_to(0);
                let rt = current_thread()?;
                rt.block_on(async move {
                    let endpoint = server_endpoint(config, socket, Arc::new(quinn::TokioRuntime))?;
                    tokio::time::timeout(TIME_LIMIT, serve(endpoint, streams))
                        .await
                        .map_err(|_| "the tokio server ran past its time limit".to_owned())?
                })
            }
        }
    });
    Ok((address, handle))
}

/// The client side of one round, `bytes` over `streams` streams: the bytes the server answered
/// and the seconds from the first stream opened to the answer.
pub(crate) fn send_all(
    address: SocketAddr,
    cert: &rcgen::CertifiedKey,
    bytes: u64,
    streams: usize,
) -> Result<(u64, f64), String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).map_err(|e| e.to_string())?;
    let mut client =
        quinn::ClientConfig::with_root_certificates(Arc::new(roots)).map_err(|e| e.to_string())?;
    client.transport_config(transport());
    let streams = streams.max(1);
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                pin_to(cpus - 1);
                let rt = current_thread()?;
                let work = async move {
                    let mut endpoint =
                        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
                    endpoint.set_default_client_config(client);
                    let connection = endpoint
                        .connect(address, "localhost")
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                    let chunk = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
                    let started = Instant::now();
                    let per_stream = bytes / streams as u64;
                    let mut writers = Vec::new();
                    for _ in 0..streams {
                        let mut send = connection.open_uni().await.map_err(|e| format!("open: {e}"))?;
                        let chunk = chunk.clone();
                        writers.push(tokio::spawn(async move {
                            let mut left = per_stream;
                            while left > 0 {
                                let piece = chunk.slice(..(left.min(chunk.len() as u64) as usize));
                                left -= piece.len() as u64;
                                send.write_chunk(piece).await.map_err(|e| format!("write: {e}"))?;
                            }
                            send.finish().map_err(|e| format!("finish: {e}"))
                        }));
                    }
                    for writer in writers {
                        writer.await.map_err(|e| e.to_string())??;
                    }
                    let mut answer = connection.accept_uni().await.map_err(|e| format!("answer: {e}"))?;
                    let total = answer.read_to_end(8).await.map_err(|e| format!("answer: {e}"))?;
                    let seconds = started.elapsed().as_secs_f64();
                    connection.close(0u32.into(), b"done");
                    endpoint.wait_idle().await;
                    let received = u64::from_le_bytes(total.try_into().map_err(|_| "a short answer")?);
                    Ok((received, seconds))
                };
                rt.block_on(async move { tokio::time::timeout(TIME_LIMIT, work).await })
                    .map_err(|_| "the client ran past its time limit".to_owned())?
            })
            .join()
            .map_err(|_| "the client panicked".to_owned())?
    })
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(options: QuicBulkOptions, git_commit: String) -> Result<QuicBulkReport, String> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).map_err(|e| e.to_string())?;
    let mut rounds = Vec::new();
    for index in 0..options.rounds.max(1) * 2 {
        let runtime = if index % 2 == 0 { ServerRuntime::Glommio } else { ServerRuntime::Tokio };
        let (address, server) = start_server(runtime, server_config(&cert), options.streams.max(1))?;
        let sent = send_all(address, &cert, options.bytes, options.streams);
        let received = server.join().map_err(|_| "the server panicked".to_owned())??;
        let (answered, seconds) = sent?;
        let expected = options.bytes / options.streams.max(1) as u64 * options.streams.max(1) as u64;
        if received != expected || answered != expected {
            return Err(format!(
                "{runtime:?} server received {received} of {expected} bytes (answered {answered})"
            ));
        }
        rounds.push(Round {
            runtime,
            bytes: received,
            seconds,
            mib_per_s: received as f64 / 1048576.0 / seconds,
        });
    }
    let of = |runtime| median(rounds.iter().filter(|r| r.runtime == runtime).map(|r| r.mib_per_s).collect());
    let (glommio, tokio) = (of(ServerRuntime::Glommio), of(ServerRuntime::Tokio));
    Ok(QuicBulkReport {
        git_commit,
        bytes: options.bytes,
        streams: options.streams,
        rounds,
        glommio_mib_per_s: glommio,
        tokio_mib_per_s: tokio,
        ratio: if tokio > 0.0 { glommio / tokio } else { 0.0 },
    })
}

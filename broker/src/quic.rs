//! QUIC on every shard, part 1: datagram steering and the connection ids that drive it
//! (DESIGN-CLUSTER.md §8; the id layout and the rule are in [`skein_net::quic`]).
//!
//! * [`SteeredGroup::bind`]: on the main thread, one UDP socket per shard in one `SO_REUSEPORT`
//!   group on the same address, with a classic BPF program ([`steering_program`]) attached to
//!   the group (`SO_ATTACH_REUSEPORT_CBPF`) that returns, for each datagram, the byte at the
//!   start of its destination connection id mod the shard count: the index of the socket in
//!   the group, i.e. the shard. Socket `k` is handed to shard `k`. The sockets live until the
//!   broker exits, so the group never renumbers (closing one would move the last into its
//!   place).
//! * [`ShardCids`]: shard `k`'s quinn connection-id generator. It issues 8-byte ids whose first
//!   byte is `k` mod the shard count and `validate`s only those, so a datagram that reaches the
//!   wrong shard (a stray, or a forged id) is dropped by quinn, never answered with a stateless
//!   reset that would kill a connection served elsewhere.
//!
//! * [`ServerSetup::new`]: TLS (certificate and key from PEM files, or a self-signed
//!   development certificate, written to the data directory for clients to trust, with a
//!   warning) and one stateless-reset key for every shard; [`ServerSetup::endpoint`] makes
//!   shard `k`'s quinn endpoint on its socket, driven by its own executor
//!   ([`crate::quic_runtime::ShardRuntime`]), with [`ShardCids`].
//! * [`serve`]: a shard's accept loop. Each bidirectional stream of a connection is served
//!   exactly as a TCP connection is (`connection::serve_stream`: the same frames, limits and
//!   errors, responses in request order on the same stream); see PROTOCOL.md, "QUIC".

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerConfig;
use crate::shard::Shard;
pub use skein_net::quic::SOCKET_BUFFER_BYTES;

/// The ALPN protocol id of Skein's frames over QUIC.
pub const ALPN: &[u8] = b"skein/0";
/// Where a broker without a configured certificate writes its development certificate.
pub const DEV_CERT_FILE: &str = "quic-dev-cert.pem";
/// The stateless-reset key's file in the data directory ([`reset_key`]).
pub const RESET_KEY_FILE: &str = "quic-reset-key";
/// The reset-key file's magic and the one version this broker reads and writes.
pub const RESET_KEY_MAGIC: [u8; 4] = *b"SKRK";
pub const RESET_KEY_VERSION: u8 = 1;

use socket2::{Domain, Protocol, Socket, Type};

use crate::steering::{op, BPF_JA, BPF_JSET_K, BPF_LD_B_ABS, BPF_MOD_K, BPF_RET_A};

/// The steering program for `shards` sockets. For a reuseport group the kernel runs it on the
/// UDP payload (the QUIC datagram) and uses the returned value as the index of the socket; a
/// load past the end of a short datagram ends the program with 0 (socket 0).
///
/// ```text
/// 0: A = datagram[0]                    first byte
/// 1: if A & 0x80 goto 2 else goto 4     long or short header
/// 2: A = datagram[6]                    long: DCID after flags, version, DCID length
/// 3: goto 5
/// 4: A = datagram[1]                    short: DCID after the flags
/// 5: A = A mod shards
/// 6: return A
/// ```
pub fn steering_program(shards: usize) -> Vec<libc::sock_filter> {
    vec![
        op(BPF_LD_B_ABS, 0, 0, 0),
        op(BPF_JSET_K, 0, 2, 0x80),
        op(BPF_LD_B_ABS, 0, 0, 6),
        op(BPF_JA, 0, 0, 1),
        op(BPF_LD_B_ABS, 0, 0, 1),
        op(BPF_MOD_K, 0, 0, shards as u32),
        op(BPF_RET_A, 0, 0, 0),
    ]
}

/// One UDP socket per shard, in one steered `SO_REUSEPORT` group.
#[derive(Debug)]
pub struct SteeredGroup {
    /// Socket `k` serves shard `k`.
    pub sockets: Vec<UdpSocket>,
    pub addr: SocketAddr,
    /// What the kernel gave each socket for buffers (bytes for data; see
    /// [`SOCKET_BUFFER_BYTES`]).
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
}

impl SteeredGroup {
    /// Binds `shards` sockets to `addr` (port 0: one picked for all) and attaches the steering
    /// program. Sockets are blocking; shards set what they need.
    pub fn bind(addr: SocketAddr, shards: usize) -> io::Result<SteeredGroup> {
        if shards == 0 || shards > 256 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{shards} shards: 1 to 256")));
        }
        let mut sockets = Vec::with_capacity(shards);
        let mut bound = addr;
        let mut buffers = (0, 0);
        for index in 0..shards {
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_reuse_port(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            buffers = size_buffers(&socket, SOCKET_BUFFER_BYTES);
            socket.bind(&bound.into())?;
            if index == 0 {
                bound = socket.local_addr()?.as_socket().expect("an IP socket");
                crate::steering::attach(&socket, steering_program(shards), "QUIC")?;
            }
            sockets.push(UdpSocket::from(socket));
        }
        Ok(SteeredGroup { sockets, addr: bound, recv_buffer_bytes: buffers.0, send_buffer_bytes: buffers.1 })
    }

    /// A warning when the kernel gave the sockets smaller buffers than
    /// [`SOCKET_BUFFER_BYTES`], naming the sysctl that caps them.
    pub fn buffer_warning(&self) -> Option<String> {
        let short = |name: &str, got: usize, sysctl: &str| {
            (got < SOCKET_BUFFER_BYTES).then(|| {
                format!(
                    "QUIC socket {name} buffer {} KiB, less than the {} KiB asked: datagrams may be dropped \
                     under load (raise it with `sysctl -w {sysctl}={SOCKET_BUFFER_BYTES}`, or run with \
                     CAP_NET_ADMIN)",
                    got >> 10,
                    SOCKET_BUFFER_BYTES >> 10
                )
            })
        };
        let warnings: Vec<String> = [
            short("receive", self.recv_buffer_bytes, "net.core.rmem_max"),
            short("send", self.send_buffer_bytes, "net.core.wmem_max"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!warnings.is_empty()).then(|| warnings.join("; "))
    }
}

/// Asks for `bytes` of receive and send buffer: first past `net.core.rmem_max`/`wmem_max`
/// (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, allowed with CAP_NET_ADMIN), else within them. Returns
/// what the kernel gave (it reports twice what it was asked for; the half is what it holds for
/// data).
fn size_buffers(socket: &Socket, bytes: usize) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let force = |option: libc::c_int| {
        // SAFETY: an int option on a socket this function borrows; the kernel copies the value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !force(libc::SO_RCVBUFFORCE) {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    if !force(libc::SO_SNDBUFFORCE) {
        let _ = socket.set_send_buffer_size(bytes);
    }
    (socket.recv_buffer_size().map_or(0, |got| got / 2), socket.send_buffer_size().map_or(0, |got| got / 2))
}

/// The stateless-reset key of this broker, the same in every process that serves this data
/// directory: read from [`RESET_KEY_FILE`], or made from `getrandom(2)` and written there
/// (temporary file, mode 0600, fsync, rename, directory fsync) the first time.
///
/// A QUIC server tells the client, for each connection id it issues, a reset token
/// (HMAC-SHA256 of the id under this key). After a crash the restarted broker has no state for
/// the client's connections; it answers their next datagram with a stateless reset carrying
/// the token (RFC 9000 §10.3), and the client drops the connection at once and reconnects.
/// With a new key per process the tokens would not match, the client would ignore the resets
/// and every connection would hang until its idle timeout (30 s by default): the key must
/// outlive the process (RFC 9000 §10.3.2: a static key).
///
/// ```text
/// offset  size  field
///      0     4  magic "SKRK"
///      4     1  version, 1
///      5    32  HMAC-SHA256 key
/// ```
///
/// Any other length, magic or version is refused by name, never replaced: a key that changes
/// silently is the hang this file exists to prevent.
pub fn reset_key(data_dir: &Path) -> Result<[u8; 32], String> {
    let path = data_dir.join(RESET_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => parse_reset_key(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            fill_random(&mut key);
            let mut bytes = Vec::with_capacity(37);
            bytes.extend_from_slice(&RESET_KEY_MAGIC);
            bytes.push(RESET_KEY_VERSION);
            bytes.extend_from_slice(&key);
            crate::metadata::write_atomically_with_mode(&path, &bytes, 0o600)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

fn parse_reset_key(bytes: &[u8]) -> Result<[u8; 32], String> {
    if bytes.len() < 5 || bytes[..4] != RESET_KEY_MAGIC {
        return Err("not a Skein QUIC reset-key file (magic SKRK)".to_owned());
    }
    if bytes[4] != RESET_KEY_VERSION {
        return Err(format!(
            "reset-key file version {} is not one this broker reads (it reads version {RESET_KEY_VERSION})",
            bytes[4]
        ));
    }
    bytes[5..]
        .try_into()
        .map_err(|_| format!("a version-1 reset-key file is 37 bytes, this one is {}", bytes.len()))
}

/// Shard `shard`'s connection ids (quinn's generator): 8 bytes, the first naming the shard
/// ([`skein_net::quic::cid_first_byte`]), the rest random.
#[derive(Debug)]
pub struct ShardCids {
    shard: usize,
    shards: usize,
    lifetime: Option<Duration>,
}

impl ShardCids {
    pub fn new(shard: usize, shards: usize) -> ShardCids {
        assert!(shard < shards && shards <= 256, "shard {shard} of {shards}");
        ShardCids { shard, shards, lifetime: None }
    }
}

impl quinn_proto::ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut bytes = [0u8; skein_net::quic::CID_BYTES];
        fill_random(&mut bytes);
        let cid = skein_net::quic::steering_dcid(self.shard, self.shards, bytes);
        quinn_proto::ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if skein_net::quic::cid_names_shard(cid, self.shard, self.shards) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        skein_net::quic::CID_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

/// Random bytes from the kernel (`getrandom(2)`): connection ids must not let an observer link
/// them to each other.
fn fill_random(bytes: &mut [u8]) {
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most the remaining length into the buffer.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_proto::ConnectionIdGenerator;

    /// Every datagram sent to the group, long header or short, lands on the socket its DCID
    /// names, whatever its source port; one too short to hold a DCID lands on socket 0.
    #[test]
    fn datagrams_land_on_the_socket_their_connection_id_names() {
        let shards = 4;
        let group = SteeredGroup::bind("127.0.0.1:0".parse().unwrap(), shards).unwrap();
        for socket in &group.sockets {
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        // Several senders (source ports): steering must not depend on the 4-tuple.
        let senders: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); shards];
        let mut sent = 0u8;
        for (shard, expected) in expected.iter_mut().enumerate() {
            for noise in [0u8, 9, 200, 255] {
                let cid = skein_net::quic::steering_dcid(shard, shards, [noise; 8]);
                let mut long = vec![0xc0, 0, 0, 0, 1, 8];
                long.extend_from_slice(&cid);
                long.push(sent);
                let mut short = vec![0x41];
                short.extend_from_slice(&cid);
                short.push(sent);
                for datagram in [long, short] {
                    assert_eq!(skein_net::quic::steered_shard(&datagram, shards), shard);
                    senders[usize::from(sent) % senders.len()].send_to(&datagram, group.addr).unwrap();
                    expected.push(datagram);
                    sent += 1;
                }
            }
        }
        // Too short to hold a DCID byte: socket 0.
        for datagram in [vec![0x40], vec![0xc0, 0, 0, 0, 1]] {
            senders[0].send_to(&datagram, group.addr).unwrap();
            expected[0].push(datagram);
        }
        for (shard, socket) in group.sockets.iter().enumerate() {
            let mut received = Vec::new();
            let mut buffer = [0u8; 64];
            for _ in 0..expected[shard].len() {
                let (n, _) = socket.recv_from(&mut buffer).expect("a datagram for this shard");
                received.push(buffer[..n].to_vec());
            }
            received.sort();
            let mut wanted = expected[shard].clone();
            wanted.sort();
            assert_eq!(received, wanted, "shard {shard}");
            // And nothing more.
            socket.set_nonblocking(true).unwrap();
            assert!(socket.recv_from(&mut buffer).is_err(), "shard {shard} got a datagram of another");
        }
    }

    /// Each socket gets the buffers it asks for where the process may pass the sysctl caps
    /// (CAP_NET_ADMIN) or the caps are high enough; elsewhere the group says so, naming the
    /// sysctl to raise.
    #[test]
    fn the_sockets_get_large_buffers_or_say_which_sysctl_caps_them() {
        let group = SteeredGroup::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status.lines().find_map(|line| line.strip_prefix("CapEff:")).unwrap().trim();
        let net_admin = u64::from_str_radix(effective, 16).unwrap() & (1 << 12) != 0;
        let cap = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap().trim().parse().unwrap()
        };
        let (rmem_max, wmem_max) = (cap("rmem_max"), cap("wmem_max"));
        for (got, max, sysctl) in [
            (group.recv_buffer_bytes, rmem_max, "net.core.rmem_max"),
            (group.send_buffer_bytes, wmem_max, "net.core.wmem_max"),
        ] {
            if net_admin || max >= SOCKET_BUFFER_BYTES {
                assert!(got >= SOCKET_BUFFER_BYTES, "{sysctl}: {got} bytes");
            } else {
                assert!(got < SOCKET_BUFFER_BYTES, "{sysctl}: {got} bytes");
                assert!(
                    group.buffer_warning().is_some_and(|w| w.contains(sysctl)),
                    "{:?}",
                    group.buffer_warning()
                );
            }
        }
        if net_admin || rmem_max.min(wmem_max) >= SOCKET_BUFFER_BYTES {
            assert_eq!(group.buffer_warning(), None);
        }
        // The kernel gave both sockets of the group the same.
        let second = Socket::from(group.sockets[1].try_clone().unwrap());
        assert_eq!(second.recv_buffer_size().unwrap() / 2, group.recv_buffer_bytes);
    }

    #[test]
    fn a_shard_issues_and_accepts_only_its_own_connection_ids() {
        let shards = 3;
        let mut generators: Vec<ShardCids> = (0..shards).map(|k| ShardCids::new(k, shards)).collect();
        for shard in 0..shards {
            let cids: Vec<quinn_proto::ConnectionId> =
                (0..200).map(|_| generators[shard].generate_cid()).collect();
            let distinct: std::collections::BTreeSet<Vec<u8>> = cids.iter().map(|c| c.to_vec()).collect();
            assert_eq!(distinct.len(), cids.len(), "random ids");
            for cid in &cids {
                assert_eq!(cid.len(), 8);
                assert_eq!(usize::from(cid[0]) % shards, shard);
                for (other, generator) in generators.iter().enumerate() {
                    assert_eq!(generator.validate(cid).is_ok(), other == shard, "shard {other} on {cid:?}");
                }
            }
        }
        assert!(generators[0].validate(&quinn_proto::ConnectionId::new(&[0; 5])).is_err());
    }

    /// The key is made once, kept (owner-only) and read back unchanged by the next process.
    #[test]
    fn the_reset_key_outlives_the_process_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = reset_key(dir.path()).unwrap();
        let path = dir.path().join(RESET_KEY_FILE);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 37);
        assert_eq!((&bytes[..4], bytes[4]), (&RESET_KEY_MAGIC[..], RESET_KEY_VERSION));
        assert_eq!(&bytes[5..], &first[..]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(reset_key(dir.path()).unwrap(), first, "the same key after a restart");
        assert_ne!(first, reset_key(tempfile::tempdir().unwrap().path()).unwrap(), "each broker its own");
    }

    /// A damaged or newer file is refused by name, never silently replaced by a new key.
    #[test]
    fn a_reset_key_file_of_another_version_or_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESET_KEY_FILE);
        let mut v2 = b"SKRK".to_vec();
        v2.push(2);
        v2.extend_from_slice(&[7; 32]);
        for (bytes, says) in [
            (v2, "version 2 is not one this broker reads"),
            (b"SKRK\x01short".to_vec(), "37 bytes, this one is 10"),
            (vec![0; 37], "magic SKRK"),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let error = reset_key(dir.path()).unwrap_err();
            assert!(error.contains(says) && error.contains(RESET_KEY_FILE), "{error}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
        }
    }

    #[test]
    fn the_group_refuses_impossible_shard_counts() {
        assert!(SteeredGroup::bind("127.0.0.1:0".parse().unwrap(), 0).is_err());
        assert!(SteeredGroup::bind("127.0.0.1:0".parse().unwrap(), 257).is_err());
    }
}

/// What every shard's QUIC endpoint shares: the TLS server settings and the reset key.
#[derive(Clone)]
pub struct ServerSetup {
    server: quinn::ServerConfig,
    reset_key: [u8; 32],
    shards: usize,
    /// The development certificate written for clients, when no certificate was configured.
    pub dev_cert: Option<PathBuf>,
}

impl std::fmt::Debug for ServerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSetup").field("shards", &self.shards).field("dev_cert", &self.dev_cert).finish()
    }
}

fn read_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("QUIC certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("QUIC certificate {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("QUIC key {}: {e}", key.display()))?;
    Ok((certs, key))
}

/// A self-signed certificate for `localhost`, 127.0.0.1, ::1 and the listen address, written
/// (certificate only) to the data directory.
fn dev_certificate(
    config: &BrokerConfig,
    listen: SocketAddr,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, PathBuf), String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.dedup();
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| format!("a development certificate: {e}"))?;
    let path = config.data_dir.join(DEV_CERT_FILE);
    std::fs::write(&path, certified.cert.pem()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let key = PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    Ok((vec![certified.cert.der().clone()], key, path))
}

impl ServerSetup {
    /// TLS from `quic_cert_file` / `quic_key_file`, or a development certificate (with a
    /// warning). The data directory must exist.
    pub fn new(config: &BrokerConfig, listen: SocketAddr, shards: usize) -> Result<ServerSetup, String> {
        let (certs, key, dev_cert) = match (&config.quic_cert_file, &config.quic_key_file) {
            (Some(cert), Some(key)) => {
                let (certs, key) = read_pem(cert, key)?;
                (certs, key, None)
            }
            (None, None) => {
                let (certs, key, path) = dev_certificate(config, listen)?;
                tracing::warn!(
                    certificate = %path.display(),
                    "QUIC without --quic-cert-file/--quic-key-file: serving a self-signed development certificate; clients must trust that file; do not use this in production"
                );
                (certs, key, Some(path))
            }
            _ => return Err("QUIC needs both --quic-cert-file and --quic-key-file (or neither, for a development certificate)".to_owned()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("QUIC TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("QUIC certificate and key: {e}"))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| format!("QUIC TLS: {e}"))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
            .map_err(|e| format!("QUIC idle timeout: {e}"))?;
        transport
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(64))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
            // One stream may take half of the connection's window, so that a stream whose
            // frame waits for request memory leaves room for the connection's other streams.
            .stream_receive_window(
                quinn::VarInt::from_u64((config.quic_receive_window / 2).min(8 << 20)).expect("within 1 GiB"),
            )
            .receive_window(quinn::VarInt::from_u64(config.quic_receive_window).expect("within 1 GiB"))
            .send_window(32 << 20);
        server.transport_config(Arc::new(transport));
        let reset_key = reset_key(&config.data_dir)?;
        Ok(ServerSetup { server, reset_key, shards, dev_cert })
    }

    /// Shard `shard`'s endpoint on its socket of the steered group; call on the shard.
    pub fn endpoint(&self, shard: usize, socket: UdpSocket) -> io::Result<quinn::Endpoint> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.reset_key);
        let mut endpoint = quinn::EndpointConfig::new(Arc::new(key));
        let shards = self.shards;
        endpoint.cid_generator(move || Box::new(ShardCids::new(shard, shards)));
        quinn::Endpoint::new(
            endpoint,
            Some(self.server.clone()),
            socket,
            Arc::new(crate::quic_runtime::ShardRuntime),
        )
    }
}

/// Accepts QUIC connections on the shard's endpoint until the broker stops; each connection
/// counts against `connections_max` like a TCP one and is refused over it as a TCP one is
/// (`TooManyConnections` to its first request, [`refuse`]); each of its bidirectional streams
/// is served like a TCP connection.
pub async fn serve(shard: Rc<Shard>, endpoint: quinn::Endpoint) {
    // Test builds only, as the other `SKEIN_TEST_` hooks: a shard whose QUIC handshakes never
    // answer (a client's connection to it waits for its connect timeout).
    let ignore = cfg!(debug_assertions)
        && std::env::var("SKEIN_TEST_QUIC_IGNORE_SHARD").is_ok_and(|v| v == shard.id.to_string());
    let refusing = Rc::new(std::cell::Cell::new(0usize));
    while let Some(incoming) = endpoint.accept().await {
        if ignore {
            incoming.ignore();
            continue;
        }
        if shard.shutting_down.get() {
            incoming.refuse();
            break;
        }
        let Some(slot) = shard.connection_slots.take() else {
            shard.metrics.connections_refused.set(shard.metrics.connections_refused.get() + 1);
            // As over TCP, the client is told why: its first request is answered with
            // `TooManyConnections`. That costs a handshake, so a flood past
            // `REFUSALS_IN_PROGRESS_MAX` of them at once gets quinn's bare refusal instead.
            if refusing.get() >= REFUSALS_IN_PROGRESS_MAX {
                incoming.refuse();
                continue;
            }
            refusing.set(refusing.get() + 1);
            let refusing = refusing.clone();
            glommio::spawn_local(async move {
                refuse(incoming).await;
                refusing.set(refusing.get() - 1);
            })
            .detach();
            continue;
        };
        shard.metrics.connections_accepted.set(shard.metrics.connections_accepted.get() + 1);
        shard.connections.set(shard.connections.get() + 1);
        let served = shard.clone();
        glommio::spawn_local(async move {
            serve_connection(&served, incoming).await;
            served.connections.set(served.connections.get() - 1);
            drop(slot);
        })
        .detach();
    }
}

/// Refusals over the connection limit a shard completes at once (handshake and answer); past
/// these a connection is refused by quinn without a reason.
pub const REFUSALS_IN_PROGRESS_MAX: usize = 64;

/// A connection over the limit: handshake, `TooManyConnections` to the first request of its
/// first stream, then closed with the reason.
async fn refuse(incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    tracing::warn!(%peer, "connection limit reached; refusing a QUIC connection");
    let wait = crate::connection::REFUSAL_WAIT;
    let Ok(Ok(connection)) = glommio::timer::timeout(wait, async { Ok(incoming.await) }).await else {
        return;
    };
    if let Ok(Ok((mut send, mut recv))) =
        glommio::timer::timeout(wait, async { Ok(connection.accept_bi().await) }).await
    {
        crate::connection::answer_too_many_connections(&mut recv, &mut send).await;
        // Let the answer reach the client before the connection goes.
        let _ = glommio::timer::timeout(wait, async { Ok(send.stopped().await) }).await;
    }
    connection.close(quinn::VarInt::from_u32(0), b"too many connections");
}

async fn serve_connection(shard: &Rc<Shard>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%peer, %error, "QUIC handshake failed");
            return;
        }
    };
    loop {
        let accepted = futures::future::select(
            Box::pin(connection.accept_bi()),
            Box::pin(glommio::timer::sleep(Duration::from_secs(1))),
        )
        .await;
        match accepted {
            futures::future::Either::Left((Ok((send, recv)), _)) => {
                // Each stream ends by itself: the client finishes it, the connection goes, or the
                // broker stops (noticed within a second).
                glommio::spawn_local(crate::connection::serve_stream(
                    shard.clone(),
                    crate::connection::QuicRequests::new(recv),
                    send,
                    None,
                    Some(peer),
                ))
                .detach();
            }
            futures::future::Either::Left((Err(error), _)) => {
                tracing::debug!(%peer, %error, "QUIC connection ended");
                break;
            }
            futures::future::Either::Right(_) => {
                if shard.shutting_down.get() {
                    connection.close(quinn::VarInt::from_u32(0), b"broker shutting down");
                    break;
                }
            }
        }
    }
}

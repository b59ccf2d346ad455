//! Steering connections to shards: one socket per shard in one `SO_REUSEPORT` group, and a
//! classic BPF program attached to the group that tells the kernel which socket takes a packet.
//!
//! * **QUIC** ([`crate::quic::SteeredGroup`]): by the first byte of a datagram's destination
//!   connection id, so a connection's datagrams reach the shard that holds its state even after
//!   the client's address changes (the rule: [`skein_net::quic`]).
//! * **TCP** ([`bind_tcp`]): by a connection's source port, so a client that binds a chosen
//!   port before it connects lands on the shard that owns its partitions, and its requests do
//!   not hop between cores (the rule: [`skein_net::tcp`]). A SYN whose port nobody chose lands
//!   on a shard as evenly as with the kernel's own hash.
//!
//! The sockets are made by the main thread, in shard order (a group's socket index is the order
//! its sockets joined: `bind(2)` for UDP, `listen(2)` for TCP), and socket `k` is handed to shard
//! `k`. A program's answer at or past the group's size makes the kernel fall back to its hash.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Socket, Type};

/// Classic BPF opcodes (linux/filter.h).
pub(crate) const BPF_LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS: A = packet[k]
pub(crate) const BPF_LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND: A = packet[X + k..][..2], big-endian
pub(crate) const BPF_LDX_B_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH: X = 4 × (packet[k] & 0xf)
pub(crate) const BPF_LDX_IMM: u16 = 0x01; // BPF_LDX | BPF_W | BPF_IMM: X = k
pub(crate) const BPF_RSH_K: u16 = 0x74; // BPF_ALU | BPF_RSH | BPF_K: A >>= k
pub(crate) const BPF_MUL_K: u16 = 0x24; // BPF_ALU | BPF_MUL | BPF_K: A *= k (mod 2³²)
pub(crate) const BPF_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K: A %= k
pub(crate) const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K: if A == k jump jt else jf
pub(crate) const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K: if A & k jump jt else jf
pub(crate) const BPF_JA: u16 = 0x05; // BPF_JMP | BPF_JA: skip k
pub(crate) const BPF_RET_A: u16 = 0x16; // BPF_RET | BPF_A: return A

/// A packet offset relative to the network (IP) header rather than to the data the program is
/// given (`SKF_NET_OFF`, linux/filter.h). For TCP the kernel hands a reuseport program the data
/// after the TCP header (none, in a SYN), so the ports are reached through the IP header.
const SKF_NET_OFF: u32 = (-0x0010_0000i32) as u32;

pub(crate) fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The TCP steering program for `shards` listeners: [`skein_net::tcp::port_shard`] of the SYN's
/// source port. The TCP header follows the IP header: 4 × IHL bytes into an IPv4 packet (an
/// IPv4-mapped client of an IPv6 listener arrives as IPv4), 40 bytes into an IPv6 one.
///
/// ```text
///  0: A = ip[0]                    version and IHL
///  1: A >>= 4                      version
///  2: if A == 6 goto 5 else goto 3
///  3: X = 4 × (ip[0] & 0xf)        IPv4: the header's length
///  4: goto 6
///  5: X = 40                       IPv6: the fixed header
///  6: A = ip[X..X + 2]             the TCP source port
///  7: A *= 0x9E3779B1              (mod 2³²)
///  8: A >>= 16
///  9: A %= shards
/// 10: return A
/// ```
pub fn tcp_steering_program(shards: usize) -> Vec<libc::sock_filter> {
    vec![
        op(BPF_LD_B_ABS, 0, 0, SKF_NET_OFF),
        op(BPF_RSH_K, 0, 0, 4),
        op(BPF_JEQ_K, 2, 0, 6),
        op(BPF_LDX_B_MSH, 0, 0, SKF_NET_OFF),
        op(BPF_JA, 0, 0, 1),
        op(BPF_LDX_IMM, 0, 0, 40),
        op(BPF_LD_H_IND, 0, 0, SKF_NET_OFF),
        op(BPF_MUL_K, 0, 0, skein_net::tcp::PORT_MULTIPLIER),
        op(BPF_RSH_K, 0, 0, 16),
        op(BPF_MOD_K, 0, 0, shards as u32),
        op(BPF_RET_A, 0, 0, 0),
    ]
}

/// Attaches `program` to the reuseport group `socket` belongs to; `what` names it in the error.
pub(crate) fn attach(socket: &Socket, mut program: Vec<libc::sock_filter>, what: &str) -> io::Result<()> {
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("attaching the {what} steering program: {error}")));
    }
    Ok(())
}

/// `shards` TCP listeners on `addr` (port 0: one picked for all), in one `SO_REUSEPORT` group
/// steered by source port: listener `k` is shard `k`'s. Blocking sockets, backlog 1024, with
/// `SO_REUSEADDR` (glommio's own `bind` omits it: connections it accepted then linger in
/// TIME_WAIT without the flag and keep a restarted broker off its port for a minute).
pub fn bind_tcp(addr: SocketAddr, shards: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if shards == 0 || shards > 256 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{shards} shards: 1 to 256")));
    }
    let mut listeners = Vec::with_capacity(shards);
    let mut bound = addr;
    for index in 0..shards {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&bound.into())?;
        // A TCP socket joins its group at listen(2): listen in shard order.
        socket.listen(1024)?;
        if index == 0 {
            bound = socket.local_addr()?.as_socket().expect("an IP socket");
            if shards > 1 {
                attach(&socket, tcp_steering_program(shards), "TCP")?;
            }
        }
        listeners.push(std::net::TcpListener::from(socket));
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Connects from `port` (on the listeners' loopback address) and says which listener
    /// accepted it, within 2 s.
    fn accepted_by(listeners: &[std::net::TcpListener], port: u16) -> Option<usize> {
        let target = listeners[0].local_addr().expect("bound");
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None).expect("a socket");
        socket.set_reuse_address(true).expect("reuse");
        let local = SocketAddr::new(target.ip(), port);
        socket.bind(&local.into()).ok()?;
        socket.connect(&target.into()).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            for (index, listener) in listeners.iter().enumerate() {
                if let Ok((stream, peer)) = listener.accept() {
                    assert_eq!(peer.port(), port, "the connection accepted is the one made");
                    drop(stream);
                    return Some(index);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no listener accepted the connection from port {port}");
    }

    #[test]
    fn connections_land_on_the_listener_their_source_port_names() {
        // IPv4 (the TCP header after 4 × IHL bytes) and IPv6 (after the fixed 40).
        for (shards, listen) in
            [(2usize, "127.0.0.1:0"), (3, "127.0.0.1:0"), (4, "127.0.0.1:0"), (2, "[::1]:0"), (3, "[::1]:0")]
        {
            let listeners = bind_tcp(listen.parse().unwrap(), shards).expect("bound");
            for listener in &listeners {
                listener.set_nonblocking(true).expect("non-blocking");
            }
            let mut tried = 0;
            let mut seen = vec![0usize; shards];
            for (shard, reached) in seen.iter_mut().enumerate() {
                for skip in 0..4 {
                    let Some(port) =
                        skein_net::tcp::port_for_shard(shard, shards, 20000..=29999, 24000, skip)
                    else {
                        continue;
                    };
                    // A port some other socket holds is skipped; enough others are tried.
                    let Some(landed) = accepted_by(&listeners, port) else { continue };
                    assert_eq!(landed, shard, "port {port}, {shards} shards on {listen}");
                    *reached += 1;
                    tried += 1;
                }
            }
            assert!(tried >= 2 * shards, "too few ports could be bound ({tried})");
            assert!(seen.iter().all(|&n| n > 0), "every shard was reached: {seen:?}");
        }
    }

    #[test]
    fn connections_from_ports_the_kernel_picks_spread_over_the_listeners() {
        let listeners = bind_tcp("127.0.0.1:0".parse().unwrap(), 2).expect("bound");
        let target = listeners[0].local_addr().expect("bound");
        for listener in &listeners {
            listener.set_nonblocking(true).expect("non-blocking");
        }
        let mut counts = [0usize; 2];
        let mut streams = Vec::new();
        for _ in 0..64 {
            let stream = std::net::TcpStream::connect(target).expect("connect");
            let port = stream.local_addr().expect("bound").port();
            streams.push(stream);
            let deadline = Instant::now() + Duration::from_secs(2);
            let landed = loop {
                assert!(Instant::now() < deadline, "no listener accepted");
                if let Some(index) = listeners.iter().position(|l| l.accept().is_ok()) {
                    break index;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(landed, skein_net::tcp::port_shard(port, 2), "port {port}");
            counts[landed] += 1;
        }
        // connect(2) hands out even ports first: a plain `port mod 2` would put all 64 on 0.
        assert!(counts.iter().all(|&n| n >= 16), "64 connections landed {counts:?}");
    }

    #[test]
    fn one_listener_takes_everything_and_impossible_counts_are_refused() {
        let listeners = bind_tcp("127.0.0.1:0".parse().unwrap(), 1).expect("bound");
        listeners[0].set_nonblocking(true).expect("non-blocking");
        let port = skein_net::tcp::port_for_shard(0, 1, 20000..=29999, 27000, 0).expect("a port");
        assert_eq!(accepted_by(&listeners, port).or_else(|| accepted_by(&listeners, port + 1)), Some(0));
        assert!(bind_tcp("127.0.0.1:0".parse().unwrap(), 0).is_err());
        assert!(bind_tcp("127.0.0.1:0".parse().unwrap(), 257).is_err());
    }
}

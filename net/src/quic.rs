//! QUIC connection ids that name the shard serving the connection (DESIGN-CLUSTER.md §8).
//!
//! A QUIC connection's datagrams must reach the shard that holds its state, even after the
//! client's address changes (a NAT rebinding, a new source port), so the 4-tuple hash of a
//! plain `SO_REUSEPORT` group is not enough. The broker puts one UDP socket per shard in one
//! `SO_REUSEPORT` group and attaches a classic BPF program that picks the socket from the first
//! byte of the datagram's **destination connection id**; each shard's endpoint issues only
//! connection ids whose first byte selects itself. This module is the pure half of that rule
//! (the broker owns the sockets and the BPF program; the client uses it to pick a first
//! connection id that lands on the shard owning its partitions).
//!
//! Where the destination connection id starts in a datagram (RFC 9000 §17):
//!
//! | header | first byte | DCID at | layout |
//! |---|---|---|---|
//! | long (Initial, 0-RTT, Handshake, Retry) | `1xxx xxxx` | byte 6 | flags (1), version (4), DCID length (1), DCID |
//! | short (1-RTT) | `0xxx xxxx` | byte 1 | flags (1), DCID (no length: the receiver knows it) |
//!
//! The connection ids a shard issues (layout version 1, 8 bytes):
//!
//! | byte | value |
//! |---|---|
//! | 0 | `shard + shards × r`, `r` random with the result below 256: `byte0 mod shards = shard` |
//! | 1..8 | random |
//!
//! The steering rule is `socket = byte mod shards` for the byte at the DCID's start; a datagram
//! too short to hold that byte goes to socket 0 (where quinn drops it). A client's first
//! Initial carries a DCID the client chose: random by default (any shard answers, and the
//! client's later Initials carry the same DCID, so they reach the same shard), or chosen with
//! [`steering_dcid`] to land on a given shard.

/// Bytes of the connection ids the broker issues.
pub const CID_BYTES: usize = 8;

/// The receive and send buffer every QUIC socket of Skein asks for, the broker's and the
/// client's. The kernel's default (about 208 KiB) overflows under a flat-out QUIC producer:
/// measured here, 1016, 1185 and 1272 datagrams dropped in three runs of 2 million 1 KiB
/// records (`nstat UdpRcvbufErrors`), each one a loss to the congestion controller; none with
/// 8 MiB. quic-go asks for 7 MiB for the same reason.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Where the destination connection id starts in a datagram with this first byte.
pub fn dcid_offset(first_byte: u8) -> usize {
    if first_byte & 0x80 != 0 {
        6
    } else {
        1
    }
}

/// The socket (shard) the steering program picks for `datagram` among `shards`: the byte at
/// the DCID's start, mod `shards`; socket 0 when the datagram is too short. The BPF program in
/// the broker computes exactly this; tests compare the two.
pub fn steered_shard(datagram: &[u8], shards: usize) -> usize {
    let Some(&first) = datagram.first() else { return 0 };
    match datagram.get(dcid_offset(first)) {
        Some(&byte) => usize::from(byte) % shards.max(1),
        None => 0,
    }
}

/// The first byte of a connection id for `shard` of `shards`, from a random byte `noise`:
/// `shard + shards × r` with `r = noise mod ⌊(256 − shard) / shards⌋` rounded up, so the value
/// stays below 256 and its remainder is `shard`.
pub fn cid_first_byte(shard: usize, shards: usize, noise: u8) -> u8 {
    assert!(shards > 0 && shards <= 256 && shard < shards, "shard {shard} of {shards}");
    let choices = (256 - shard).div_ceil(shards);
    let r = usize::from(noise) % choices;
    (shard + shards * r) as u8
}

/// Whether a connection id (of the broker's length) names `shard` of `shards`.
pub fn cid_names_shard(cid: &[u8], shard: usize, shards: usize) -> bool {
    cid.len() == CID_BYTES && usize::from(cid[0]) % shards.max(1) == shard
}

/// A first destination connection id for a client that wants its connection served by
/// `shard` of `shards` (the one owning its partitions): `random` with its first byte replaced.
pub fn steering_dcid(shard: usize, shards: usize, mut random: [u8; CID_BYTES]) -> [u8; CID_BYTES] {
    random[0] = cid_first_byte(shard, shards, random[0]);
    random
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_first_byte_of_a_shard_steers_to_it_for_any_shard_count() {
        for shards in 1..=256usize {
            for shard in 0..shards {
                for noise in [0u8, 1, 77, 128, 254, 255] {
                    let byte = cid_first_byte(shard, shards, noise);
                    assert_eq!(usize::from(byte) % shards, shard, "{shard} of {shards}, noise {noise}");
                    let cid = steering_dcid(shard, shards, [noise; CID_BYTES]);
                    assert!(cid_names_shard(&cid, shard, shards));
                    // Short header: flags, then the DCID.
                    let mut short = vec![0x40];
                    short.extend_from_slice(&cid);
                    assert_eq!(steered_shard(&short, shards), shard);
                    // Long header: flags, version, DCID length, DCID.
                    let mut long = vec![0xc0, 0, 0, 0, 1, CID_BYTES as u8];
                    long.extend_from_slice(&cid);
                    assert_eq!(steered_shard(&long, shards), shard);
                }
            }
        }
    }

    #[test]
    fn the_first_byte_uses_the_whole_range_it_can() {
        // 3 shards: shard 0 can be 0, 3, ..., 255 (86 values); all reachable from noise.
        let values: std::collections::BTreeSet<u8> = (0..=255u8).map(|n| cid_first_byte(0, 3, n)).collect();
        assert_eq!(values.len(), 86);
        assert_eq!(values.last(), Some(&255));
    }

    #[test]
    fn short_datagrams_and_foreign_ids_are_told_apart() {
        assert_eq!(steered_shard(&[], 4), 0);
        assert_eq!(steered_shard(&[0x40], 4), 0, "no DCID byte");
        assert_eq!(steered_shard(&[0xc0, 0, 0, 0, 1], 4), 0, "a long header cut before its DCID");
        assert!(!cid_names_shard(&[1; 7], 1, 4), "a 7-byte id is not one of ours");
        assert!(!cid_names_shard(&[2; CID_BYTES], 1, 4), "another shard's");
    }
}

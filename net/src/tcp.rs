//! TCP connections that land on a chosen shard: the source-port rule.
//!
//! Every shard of a broker accepts TCP connections on one `SO_REUSEPORT` group of listeners,
//! one per shard. Without steering the kernel picks the listener by a hash of the 4-tuple, so a
//! client cannot know which shard serves its connection, and every request for a partition of
//! another shard costs a hop between cores (the accepting shard forwards it, and copies the
//! records across). The broker attaches a classic BPF program to the group that picks the
//! listener from the connection's **source port**; a client that wants shard `s` binds a
//! source port that the rule maps to `s` before it connects (ScyllaDB's shard-aware drivers do
//! the same). This module is the pure half of that rule: the broker computes it in BPF, the
//! client uses [`port_for_shard`] to choose its port, tests compare the two.
//!
//! The rule (version 1):
//!
//! ```text
//! shard = ((source_port × 0x9E37_79B1 mod 2³²) >> 16) mod shards
//! ```
//!
//! A multiplicative hash rather than `port mod shards`: Linux gives `connect(2)` even ports
//! first (and `bind(2)` odd ones), so with two shards the plain remainder would put every
//! ordinary client on shard 0. The hash spreads consecutive ports, of either parity, over all
//! shards, so clients that do not choose still land evenly.
//!
//! A client behind a NAT that rewrites its source port lands wherever the rewritten port
//! points: it is served as any connection is (the broker forwards what another shard holds), it
//! only loses the saved hop.

/// The multiplier of the steering hash (2³² divided by the golden ratio).
pub const PORT_MULTIPLIER: u32 = 0x9E37_79B1;

/// The shard (listener index) the broker's steering program picks for a connection from
/// `port` among `shards`.
pub fn port_shard(port: u16, shards: usize) -> usize {
    let hashed = u32::from(port).wrapping_mul(PORT_MULTIPLIER) >> 16;
    hashed as usize % shards.max(1)
}

/// A source port in `range` (inclusive) that lands on `shard` of `shards`, starting the search
/// at `start` (a random value, so that clients do not all try the same ports) and skipping the
/// first `skip` matches (the caller's retries after `EADDRINUSE`). `None` when the range holds
/// none (a range of a handful of ports).
pub fn port_for_shard(
    shard: usize,
    shards: usize,
    range: std::ops::RangeInclusive<u16>,
    start: u16,
    skip: usize,
) -> Option<u16> {
    let (low, high) = (u32::from(*range.start()), u32::from(*range.end()));
    if low > high || shard >= shards.max(1) {
        return None;
    }
    let width = high - low + 1;
    let mut skipped = 0;
    for step in 0..width {
        let port = (low + (u32::from(start).wrapping_sub(low) + step) % width) as u16;
        if port_shard(port, shards) == shard {
            if skipped == skip {
                return Some(port);
            }
            skipped += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chosen_port_lands_on_its_shard_for_any_shard_count() {
        for shards in 1..=64usize {
            for shard in 0..shards {
                for (start, skip) in [(32768u16, 0usize), (40000, 3), (60999, 1), (1, 0)] {
                    let port = port_for_shard(shard, shards, 32768..=60999, start, skip)
                        .unwrap_or_else(|| panic!("no port for {shard} of {shards}"));
                    assert!((32768..=60999).contains(&port));
                    assert_eq!(port_shard(port, shards), shard, "{shard} of {shards} from {start}");
                }
            }
        }
    }

    #[test]
    fn retries_get_other_ports_and_a_tiny_range_may_hold_none() {
        let first = port_for_shard(1, 4, 32768..=60999, 50000, 0).expect("a port");
        let second = port_for_shard(1, 4, 32768..=60999, 50000, 1).expect("a port");
        assert_ne!(first, second);
        // A one-port range holds a port of exactly one shard.
        let only = 40000u16;
        let its = port_shard(only, 4);
        assert_eq!(port_for_shard(its, 4, only..=only, only, 0), Some(only));
        assert_eq!(port_for_shard((its + 1) % 4, 4, only..=only, only, 0), None);
        assert_eq!(port_for_shard(4, 4, 1..=65535, 1, 0), None, "no shard 4 of 4");
    }

    #[test]
    fn the_ports_the_kernel_hands_out_spread_over_the_shards() {
        // connect(2) takes even ports first: both parities must spread evenly.
        for parity in [0u16, 1] {
            for shards in [2usize, 3, 4, 8] {
                let mut counts = vec![0usize; shards];
                for port in (32768u16..60999).filter(|p| p % 2 == parity) {
                    counts[port_shard(port, shards)] += 1;
                }
                let mean = counts.iter().sum::<usize>() / shards;
                for (shard, &count) in counts.iter().enumerate() {
                    assert!(
                        count.abs_diff(mean) * 20 < mean,
                        "{shards} shards, parity {parity}: shard {shard} got {count}, mean {mean}"
                    );
                }
            }
        }
    }
}

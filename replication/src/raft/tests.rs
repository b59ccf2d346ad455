//! Three members on a test network that delivers every message in order: an election, a
//! commit on every member, the persistence-before-send rule, and seeded elections.

use ::raft::eraftpb::MessageType;

use super::*;

struct Net {
    members: Vec<RaftCore>,
    /// Messages in flight, in send order.
    wire: Vec<Message>,
    applied: Vec<Vec<Vec<u8>>>,
}

impl Net {
    fn new(seed: u64) -> Net {
        let members = (1..=3)
            .map(|id| {
                RaftCore::new(&RaftSettings {
                    id,
                    voters: vec![1, 2, 3],
                    election_tick: 10,
                    heartbeat_tick: 2,
                    seed: seed * 10 + id,
                    persist_before_send: true,
                })
                .unwrap()
            })
            .collect();
        Net { members, wire: Vec::new(), applied: vec![Vec::new(); 3] }
    }

    /// Drains every member's ready (persisting at once) and delivers the messages.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut progressed = false;
            for (i, member) in self.members.iter_mut().enumerate() {
                while let Some(output) = member.ready() {
                    progressed = true;
                    self.wire.extend(output.send);
                    self.applied[i].extend(output.committed.into_iter().map(|e| e.data.to_vec()));
                    let after = member.persisted();
                    self.wire.extend(after.send);
                    self.applied[i].extend(after.committed.into_iter().map(|e| e.data.to_vec()));
                }
            }
            for message in std::mem::take(&mut self.wire) {
                progressed = true;
                let to = message.to as usize - 1;
                let _ = self.members[to].step(message);
            }
            if !progressed {
                return;
            }
        }
        panic!("the network did not settle");
    }

    /// Ticks every member until one leads; returns (ticks, leader id).
    fn elect(&mut self) -> (usize, u64) {
        for tick in 1..=200 {
            for member in &mut self.members {
                member.tick();
            }
            self.settle();
            let leaders: Vec<u64> = self.members.iter().filter(|m| m.is_leader()).map(|m| m.id()).collect();
            assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
            if let [leader] = leaders[..] {
                return (tick, leader);
            }
        }
        panic!("no leader within 200 ticks");
    }
}

#[test]
fn a_leader_is_elected_and_a_proposal_is_committed_everywhere() {
    let mut net = Net::new(1);
    let (_, leader) = net.elect();
    assert!(net.members.iter().all(|m| m.leader_id() == leader), "everyone knows the leader");
    net.members[leader as usize - 1].propose(b"create topic t".to_vec()).unwrap();
    net.settle();
    for applied in &net.applied {
        assert_eq!(applied, &vec![b"create topic t".to_vec()]);
    }
    // A follower cannot propose.
    let follower = net.members.iter_mut().find(|m| !m.is_leader()).unwrap();
    assert!(follower.propose(b"x".to_vec()).is_err());
}

#[test]
fn messages_that_depend_on_the_disk_wait_until_it_is_written() {
    let mut net = Net::new(2);
    let (_, leader) = net.elect();
    net.members[leader as usize - 1].propose(b"record".to_vec()).unwrap();
    // The leader's append goes out at once.
    let output = net.members[leader as usize - 1].ready().unwrap();
    assert!(!output.persist_entries.is_empty(), "the leader persists the entry it appends");
    let appends: Vec<Message> =
        output.send.into_iter().filter(|m| m.get_msg_type() == MessageType::MsgAppend).collect();
    assert_eq!(appends.len(), 2);
    net.wire.extend(net.members[leader as usize - 1].persisted().send);
    // A follower receiving it must persist before it acknowledges.
    let to = appends[0].to;
    net.members[to as usize - 1].step(appends[0].clone()).unwrap();
    let output = net.members[to as usize - 1].ready().unwrap();
    assert!(!output.persist_entries.is_empty());
    assert!(
        !output.send.iter().any(|m| m.get_msg_type() == MessageType::MsgAppendResponse),
        "no acknowledgement before the entries are durable"
    );
    assert!(net.members[to as usize - 1].ready().is_none(), "nothing more until the shell says persisted");
    let after = net.members[to as usize - 1].persisted();
    assert!(after.send.iter().any(|m| m.get_msg_type() == MessageType::MsgAppendResponse));
}

#[test]
fn one_seed_gives_one_election_history() {
    let histories: Vec<(usize, u64, Vec<usize>)> = [5u64, 5, 6]
        .iter()
        .map(|&seed| {
            let mut net = Net::new(seed);
            let timeouts = net.members.iter().map(RaftCore::election_timeout).collect();
            let (ticks, leader) = net.elect();
            (ticks, leader, timeouts)
        })
        .collect();
    assert_eq!(histories[0], histories[1], "the same seed replays the same election");
    assert!(
        histories[0].2.iter().all(|t| (10..20).contains(t)),
        "timeouts in [election_tick, 2 x election_tick)"
    );
    // Another seed draws other timeouts (the election may still end the same way).
    assert_ne!(histories[0].2, histories[2].2);
}

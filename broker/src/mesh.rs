//! The cross-shard mesh: typed, fallible calls from one shard to another.
//!
//! Shards exchange [`MeshMessage`]s through glommio's lock-free single-producer
//! single-consumer channels, one per ordered pair of shards. A call is one of the operation
//! types below (each implements [`Call`], which names its reply type), sent with a deadline:
//! [`Mesh::send`] returns once the request is queued on the target's channel (so requests from
//! one task to one shard are dispatched there in the order they were sent) and gives the
//! future of the typed reply. Every way a call can fail is a [`MeshError`], never a panic and
//! never a placeholder reply: the target shard is stopped or stopping (its channel is closed,
//! or it went away with the call unanswered), the deadline passed, or the reply was not the
//! one the operation expects.
//!
//! Lives on one shard's executor; the pending-reply table is touched only there.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use glommio::channels::channel_mesh::Senders;
use skein_net::{
    ErrorCode, GroupListing, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsPartitionResponse,
    NewTopic, ProducePartitionResponse, TopicResult,
};

use crate::groups::GroupOp;
use crate::oneshot;
use crate::shard::{FetchOutcome, LocalFuture};
use skein_net::types::{Offset, ShardId, TopicPartition};
use skein_replication::metadata::{MetadataRecord, TopicConfig};

/// What travels between two shards.
#[derive(Debug)]
pub enum MeshMessage {
    Request { id: u64, op: Op },
    Reply { id: u64, reply: Reply },
}

/// Why a cross-shard call did not get its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error("shard {target} is not reachable (stopped or stopping)")]
    Unreachable { target: ShardId },
    #[error("shard {target} did not answer a {op} call within {after:?}")]
    TimedOut { target: ShardId, op: &'static str, after: Duration },
    #[error("shard {target} answered a {op} call with another operation's reply")]
    WrongReply { target: ShardId, op: &'static str },
}

impl MeshError {
    /// The error a client gets for it: both retriable, as the shard may be back (a restart) or
    /// just slow.
    pub fn code(&self) -> ErrorCode {
        match self {
            MeshError::Unreachable { .. } => ErrorCode::ShuttingDown,
            MeshError::TimedOut { .. } => ErrorCode::RequestTimedOut,
            MeshError::WrongReply { .. } => ErrorCode::UnknownServerError,
        }
    }
}

/// A cross-shard operation and the type of its answer.
pub trait Call: Sized {
    type Reply;
    /// Its name in errors and logs.
    const NAME: &'static str;
    fn into_op(self) -> Op;
    fn from_reply(reply: Reply) -> Option<Self::Reply>;
}

/// Append records (one or more whole batches) to a partition the target owns.
#[derive(Debug)]
pub struct Produce {
    pub tp: TopicPartition,
    pub records: BytesMut,
    pub acks: i8,
    pub timeout_ms: u32,
}

/// One partition of a [`Fetch`]: where to read from and at most how many bytes.
#[derive(Debug, Clone)]
pub struct FetchRead {
    pub tp: TopicPartition,
    pub offset: Offset,
    pub partition_bytes_max: u32,
}

/// Read from partitions the target owns, within a byte budget for all of them.
#[derive(Debug)]
pub struct Fetch {
    pub reads: Vec<FetchRead>,
    pub bytes_max: u32,
}

/// Resolve when any of the partitions has records after its offset, or at the timeout.
#[derive(Debug)]
pub struct WaitForData {
    pub partitions: Vec<(TopicPartition, Offset)>,
    pub timeout_ms: u32,
}

/// The offsets of a request's partitions that one shard owns, each at a timestamp (or the
/// earliest or latest): one call per shard, not one per partition.
#[derive(Debug)]
pub struct ListOffsets {
    pub partitions: Vec<(TopicPartition, i64)>,
}

/// To the controller shard: create topics.
#[derive(Debug)]
pub struct CreateTopics(pub Vec<NewTopic>);

/// To the controller shard: grow topics to a partition count each.
#[derive(Debug)]
pub struct CreatePartitions(pub Vec<(String, u32)>);

/// To the controller shard: change topics' settings.
#[derive(Debug)]
pub struct AlterConfigs(pub skein_net::AlterConfigsRequest);

/// To the controller shard: delete topics.
#[derive(Debug)]
pub struct DeleteTopics(pub Vec<String>);

/// From the controller: a topic is being created; create the partitions placed on the target
/// (the prepare step: they serve nothing until the topic's record is applied).
#[derive(Debug)]
pub struct PrepareCreate {
    pub name: String,
    pub config: TopicConfig,
}

/// From the controller: a creation was called off; remove what [`PrepareCreate`] made.
#[derive(Debug)]
pub struct DropPrepared {
    pub name: String,
}

/// From the controller: committed metadata records, to apply to the target's image (it then
/// opens and closes partitions to match). The answer says whether they applied and every
/// partition placed there opened.
#[derive(Debug)]
pub struct ApplyRecords(pub Vec<MetadataRecord>);

/// To the controller shard: a producer id, or the next epoch of one.
#[derive(Debug)]
pub struct InitProducerId(pub InitProducerIdRequest);

/// To a group's coordinator shard; the answer is an encoded response body.
#[derive(Debug)]
pub struct Group(pub GroupOp);

/// The groups the target coordinates.
#[derive(Debug)]
pub struct ListGroups;

/// Every operation, as it travels.
#[derive(Debug)]
pub enum Op {
    Produce(Produce),
    Fetch(Fetch),
    WaitForData(WaitForData),
    ListOffsets(ListOffsets),
    CreateTopics(CreateTopics),
    DeleteTopics(DeleteTopics),
    CreatePartitions(CreatePartitions),
    AlterConfigs(AlterConfigs),
    PrepareCreate(PrepareCreate),
    DropPrepared(DropPrepared),
    ApplyRecords(ApplyRecords),
    InitProducerId(InitProducerId),
    Group(Group),
    ListGroups(ListGroups),
}

/// Every answer, as it travels.
#[derive(Debug)]
pub enum Reply {
    Produce(ProducePartitionResponse),
    Fetch(Vec<FetchOutcome>),
    DataArrived,
    ListOffsets(Vec<ListOffsetsPartitionResponse>),
    Topics(Vec<TopicResult>),
    /// Metadata applied (or why not); also the answer to [`DropPrepared`].
    Applied(Result<(), String>),
    ProducerId(InitProducerIdResponse),
    /// A shard's partitions of a new topic: created, or why not.
    Created(Result<(), (ErrorCode, String)>),
    /// An encoded response body.
    Body(BytesMut),
    Groups(Vec<GroupListing>),
}

macro_rules! calls {
    ($($call:ident => $reply_variant:ident($pattern:pat) -> $reply:ty = $value:expr;)*) => {$(
        impl Call for $call {
            type Reply = $reply;
            const NAME: &'static str = stringify!($call);
            fn into_op(self) -> Op {
                Op::$call(self)
            }
            fn from_reply(reply: Reply) -> Option<$reply> {
                match reply {
                    Reply::$reply_variant($pattern) => Some($value),
                    _ => None,
                }
            }
        }
    )*};
}

calls! {
    Produce => Produce(response) -> ProducePartitionResponse = response;
    Fetch => Fetch(outcomes) -> Vec<FetchOutcome> = outcomes;
    ListOffsets => ListOffsets(responses) -> Vec<ListOffsetsPartitionResponse> = responses;
    CreateTopics => Topics(results) -> Vec<TopicResult> = results;
    DeleteTopics => Topics(results) -> Vec<TopicResult> = results;
    CreatePartitions => Topics(results) -> Vec<TopicResult> = results;
    AlterConfigs => Topics(results) -> Vec<TopicResult> = results;
    PrepareCreate => Created(result) -> Result<(), (ErrorCode, String)> = result;
    DropPrepared => Applied(result) -> Result<(), String> = result;
    ApplyRecords => Applied(result) -> Result<(), String> = result;
    InitProducerId => ProducerId(response) -> InitProducerIdResponse = response;
    Group => Body(body) -> BytesMut = body;
    ListGroups => Groups(groups) -> Vec<GroupListing> = groups;
}

impl Call for WaitForData {
    type Reply = ();
    const NAME: &'static str = "WaitForData";
    fn into_op(self) -> Op {
        Op::WaitForData(self)
    }
    fn from_reply(reply: Reply) -> Option<()> {
        matches!(reply, Reply::DataArrived).then_some(())
    }
}

/// Deadline of calls that name none: every cross-shard call is bounded.
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// A call waiting for its reply.
struct Pending {
    target: ShardId,
    reply: oneshot::Sender<Reply>,
}

/// One shard's end of the mesh.
pub struct Mesh {
    id: ShardId,
    senders: Senders<MeshMessage>,
    pending: Rc<RefCell<HashMap<u64, Pending>>>,
    next_id: Cell<u64>,
}

impl Mesh {
    pub fn new(id: ShardId, senders: Senders<MeshMessage>) -> Mesh {
        Mesh { id, senders, pending: Rc::new(RefCell::new(HashMap::new())), next_id: Cell::new(0) }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    /// Queues `call` on shard `target` (never this shard: the caller runs local calls itself)
    /// and returns the future of its reply, which resolves by `timeout` at the latest.
    pub async fn send<C: Call + 'static>(
        &self,
        target: ShardId,
        call: C,
        timeout: Duration,
    ) -> Result<LocalFuture<Result<C::Reply, MeshError>>, MeshError>
    where
        C::Reply: 'static,
    {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (sender, receiver) = oneshot::channel();
        self.pending.borrow_mut().insert(id, Pending { target, reply: sender });
        let sent =
            self.senders.send_to(target.index(), MeshMessage::Request { id, op: call.into_op() }).await;
        if sent.is_err() {
            self.pending.borrow_mut().remove(&id);
            return Err(MeshError::Unreachable { target });
        }
        let pending = PendingGuard { table: self.pending.clone(), id };
        Ok(Box::pin(async move {
            let answer =
                match futures::future::select(receiver, Box::pin(glommio::timer::sleep(timeout))).await {
                    futures::future::Either::Left((Some(reply), _)) => {
                        C::from_reply(reply).ok_or(MeshError::WrongReply { target, op: C::NAME })
                    }
                    // The table dropped the sender: the target went away without answering.
                    futures::future::Either::Left((None, _)) => Err(MeshError::Unreachable { target }),
                    futures::future::Either::Right(_) => {
                        Err(MeshError::TimedOut { target, op: C::NAME, after: timeout })
                    }
                };
            drop(pending);
            answer
        }))
    }

    /// Hands a reply that arrived to the call waiting for it (a reply to a call that gave up
    /// meanwhile is dropped).
    pub fn deliver(&self, id: u64, reply: Reply) {
        if let Some(pending) = self.pending.borrow_mut().remove(&id) {
            pending.reply.send(reply);
        }
    }

    /// The channel from `peer` closed: it stopped. Its unanswered calls fail now instead of at
    /// their deadlines.
    pub fn peer_gone(&self, peer: ShardId) {
        self.pending.borrow_mut().retain(|_, pending| pending.target != peer);
    }

    /// Answers a request from `peer`.
    pub async fn reply(&self, peer: ShardId, id: u64, reply: Reply) {
        let _ = self.senders.send_to(peer.index(), MeshMessage::Reply { id, reply }).await;
    }

    /// Calls waiting for replies.
    pub fn pending(&self) -> usize {
        self.pending.borrow().len()
    }
}

/// Removes a call's table entry when its future ends or is dropped (a timed-out or abandoned
/// call leaves nothing behind).
struct PendingGuard {
    table: Rc<RefCell<HashMap<u64, Pending>>>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.table.borrow_mut().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use glommio::channels::channel_mesh::{MeshBuilder, Receivers};
    use glommio::LocalExecutorBuilder;

    use super::*;

    type Peer = Box<
        dyn FnOnce(Receivers<MeshMessage>, Senders<MeshMessage>, mpsc::Sender<()>) -> LocalFuture<()> + Send,
    >;

    /// Runs `peer` as shard 1 and `check` as shard 0 on two executors joined by a real glommio
    /// mesh; shard 0 routes the replies it receives to its [`Mesh`] as a shard's serve loop
    /// does. Returns what `check` returned.
    fn two_shards<T: Send + 'static>(
        peer: Peer,
        check: impl FnOnce(Rc<Mesh>, ShardId, mpsc::Receiver<()>) -> LocalFuture<T> + Send + 'static,
    ) -> T {
        let mesh: MeshBuilder<MeshMessage, _> = MeshBuilder::full(2, 8);
        let (signal, wait) = mpsc::channel();
        let mesh_1 = mesh.clone();
        let one = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (senders, receivers) = mesh_1.join().await.unwrap();
                peer(receivers, senders, signal).await;
            })
            .unwrap();
        let zero = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (senders, mut receivers) = mesh.join().await.unwrap();
                // Positions in a mesh go by the order of joining: the peer is the other one.
                let me = senders.peer_id();
                let mesh = Rc::new(Mesh::new(ShardId::from_index(me), senders));
                for (peer, receiver) in receivers.streams() {
                    let mesh = mesh.clone();
                    glommio::spawn_local(async move {
                        while let Some(message) = receiver.recv().await {
                            if let MeshMessage::Reply { id, reply } = message {
                                mesh.deliver(id, reply);
                            }
                        }
                        mesh.peer_gone(ShardId::from_index(peer));
                    })
                    .detach();
                }
                check(mesh, ShardId::from_index(1 - me), wait).await
            })
            .unwrap();
        let result = zero.join().unwrap();
        one.join().unwrap();
        result
    }

    async fn list_groups(
        mesh: &Mesh,
        peer: ShardId,
        timeout: Duration,
    ) -> (Result<Vec<GroupListing>, MeshError>, usize) {
        let outcome = match mesh.send(peer, ListGroups, timeout).await {
            Err(error) => Err(error),
            Ok(reply) => reply.await,
        };
        (outcome, mesh.pending())
    }

    #[test]
    fn a_call_to_a_stopped_shard_is_an_error() {
        let ((outcome, pending), peer) = two_shards(
            Box::new(|receivers, senders, stopped| {
                Box::pin(async move {
                    // The peer stops at once: its ends of the mesh close.
                    drop(receivers);
                    senders.close();
                    drop(senders);
                    stopped.send(()).unwrap();
                })
            }),
            |mesh, peer, stopped| {
                Box::pin(async move {
                    stopped.recv().unwrap();
                    (list_groups(&mesh, peer, Duration::from_secs(5)).await, peer)
                })
            },
        );
        assert_eq!(outcome, Err(MeshError::Unreachable { target: peer }));
        assert_eq!(pending, 0);
    }

    #[test]
    fn a_call_nobody_answers_times_out_and_leaves_nothing_behind() {
        let ((outcome, pending), peer) = two_shards(
            Box::new(|mut receivers, senders, _| {
                Box::pin(async move {
                    // The peer (alive: its channels stay open) reads the request and never
                    // answers it.
                    let _open = senders;
                    let (_, receiver) = receivers.streams().pop().unwrap();
                    let request = receiver.recv().await;
                    assert!(matches!(request, Some(MeshMessage::Request { op: Op::ListGroups(_), .. })));
                    glommio::timer::sleep(Duration::from_millis(300)).await;
                })
            }),
            |mesh, peer, _| {
                Box::pin(async move { (list_groups(&mesh, peer, Duration::from_millis(100)).await, peer) })
            },
        );
        let after = Duration::from_millis(100);
        assert_eq!(outcome, Err(MeshError::TimedOut { target: peer, op: "ListGroups", after }));
        assert_eq!(pending, 0);
    }

    #[test]
    fn answers_come_back_typed_and_a_wrong_one_is_an_error_not_a_panic() {
        let (first, second, pending, peer) = two_shards(
            Box::new(|mut receivers, senders, _| {
                Box::pin(async move {
                    let (peer, receiver) = receivers.streams().pop().unwrap();
                    // The first call gets its right answer, the second another operation's.
                    for reply in [Reply::Groups(Vec::new()), Reply::Applied(Ok(()))] {
                        if let Some(MeshMessage::Request { id, .. }) = receiver.recv().await {
                            let _ = senders.send_to(peer, MeshMessage::Reply { id, reply }).await;
                        }
                    }
                })
            }),
            |mesh, peer, _| {
                Box::pin(async move {
                    let (first, _) = list_groups(&mesh, peer, Duration::from_secs(5)).await;
                    let (second, pending) = list_groups(&mesh, peer, Duration::from_secs(5)).await;
                    (first, second, pending, peer)
                })
            },
        );
        assert_eq!(first, Ok(Vec::new()));
        assert_eq!(second, Err(MeshError::WrongReply { target: peer, op: "ListGroups" }));
        assert_eq!(pending, 0);
    }
}

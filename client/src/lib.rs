//! # skein-client: the native Rust client
//!
//! An async library on tokio for Skein brokers: [`Admin`] manages topics, [`Producer`] writes
//! records (batched per partition, with a future per record), [`Consumer`] reads them from
//! any offset or timestamp (prefetching the next fetch while you work).
//!
//! It speaks the protocol of `skein-net` and builds and checks record batches with
//! `skein-storage`'s format (without its engine): every batch a consumer receives has its CRC
//! checked before a record is handed out.
//!
//! ## Example
//! ```no_run
//! use std::time::Duration;
//! use skein_client::{Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo};
//!
//! # async fn example() -> Result<(), skein_client::ClientError> {
//! let client = Client::connect(ClientConfig::new("127.0.0.1:9400")).await?;
//! Admin::new(client.clone()).create_topic("orders", 4, &[]).await?;
//!
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! let delivery = producer.send(ProducerRecord::new("orders", "hello").key("customer-7")).await?;
//! let metadata = delivery.await?; // acknowledged: partition and offset
//! println!("written to partition {} at offset {:?}", metadata.partition, metadata.offset);
//! producer.flush().await?;
//!
//! let mut consumer = Consumer::new(client, ConsumerConfig::default());
//! consumer.assign("orders", &[0, 1, 2, 3]).await?;
//! consumer.seek_all(SeekTo::Beginning).await?;
//! for record in consumer.poll(Duration::from_secs(1)).await? {
//!     println!("{}/{} @{}: {:?}", record.topic, record.partition, record.offset, record.value);
//! }
//! # Ok(()) }
//! ```

/// Chained setters for a config struct's fields (`ProducerConfig::default().linger(d)`): the
/// config structs are `#[non_exhaustive]`, so new settings never break a caller's code.
macro_rules! setters {
    ($ty:ident { $($field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets [`", stringify!($ty), "::", stringify!($field), "`].")]
                #[must_use]
                pub fn $field(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}
pub(crate) use setters;

mod admin;
mod connection;
mod consumer;
mod error;
mod fetcher;
pub mod group;
mod producer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use skein_net::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, DecodeError, ErrorCode, MetadataRequest,
    MetadataResponse, Reader, Request,
};

pub use crate::admin::{Admin, GroupDescription, PartitionDescription, PartitionLag, TopicDescription};
pub use crate::admin::{OffsetReset, ResetTo};
pub use crate::connection::Connection;
pub use crate::consumer::Consumer;
pub use crate::error::{ClientError, Result};
pub use crate::fetcher::{ConsumerConfig, ConsumerRecord, SeekTo};
pub use crate::group::{GroupConfig, RebalanceEvent};
pub use crate::producer::{Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
pub use skein_net::ErrorCode as BrokerErrorCode;
pub use skein_net::{GroupListing, MemberDescription, TopicPartition};

/// How to reach the broker: `ClientConfig::new("host:9400").client_id("billing")`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `host:port` of a broker, or several separated by commas (`a:9400,b:9400`): tried in
    /// order at each (re)connection until one answers.
    pub bootstrap: String,
    pub client_id: String,
    pub connect_timeout: Duration,
    /// How long a request waits for its answer (a fetch: this beyond its `max_wait_ms`). A
    /// request that gets none fails with [`ClientError::Timeout`] and its connection is given
    /// up, as Kafka's client does: the other requests on it fail as on a lost connection
    /// (retried on a new one), since a connection into a silent network would otherwise take
    /// every retry into the same silence (`cli/tests/silent_network.rs`).
    pub request_timeout: Duration,
    /// How long a request keeps being retried after a lost or refused connection (a broker
    /// restart) before it fails: [`Client::request`] reconnects and sends it again.
    pub retry_timeout: Duration,
    /// Requests in flight on the connection at once.
    pub in_flight_max: usize,
    /// TCP (the default) or QUIC; the bootstrap addresses are of that transport.
    pub transport: Transport,
    /// A producer and a consumer open a connection per shard of the broker and send each
    /// partition's requests on its shard's (default `true`; see [`Client`]); `false`:
    /// everything on one connection (and the broker forwards what another shard holds).
    pub connection_per_shard: bool,
}

/// How a client reaches a broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Tcp,
    /// QUIC (TLS 1.3, ALPN `skein/0`): one connection, the requests on one bidirectional
    /// stream in order, as on TCP.
    Quic {
        /// The name the broker's certificate must carry (default: the host of the address).
        server_name: Option<String>,
        /// PEM file of the certificate authorities to trust (a broker without a configured
        /// certificate writes its development certificate to `quic-dev-cert.pem` in its data
        /// directory: trust that file).
        ca_file: std::path::PathBuf,
        /// `(shard, shards)`: pick the first connection id so that the connection lands on
        /// shard `shard` of a broker with `shards` shards (the one that owns the partitions this
        /// client uses most saves a hop per request); `None`: wherever a random id steers it.
        first_shard: Option<(usize, usize)>,
    },
}

impl ClientConfig {
    pub fn new(bootstrap: impl Into<String>) -> ClientConfig {
        ClientConfig {
            bootstrap: bootstrap.into(),
            client_id: "skein-client".into(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            retry_timeout: Duration::from_secs(30),
            in_flight_max: 64,
            transport: Transport::Tcp,
            connection_per_shard: true,
        }
    }
}

setters!(ClientConfig {
    bootstrap: String,
    client_id: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry_timeout: Duration,
    in_flight_max: usize,
    transport: Transport,
    connection_per_shard: bool,
});

/// A topic as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    pub configs: Vec<(String, String)>,
    /// The broker's shard holding each partition (Metadata v2; empty from an older broker).
    pub shards: Vec<Option<u16>>,
}

impl TopicInfo {
    /// The topic's largest batch (`max.message.bytes`), if the broker told.
    pub fn max_message_bytes(&self) -> Option<usize> {
        self.configs.iter().find(|(k, _)| k == "max.message.bytes").and_then(|(_, v)| v.parse().ok())
    }

    /// The broker's shard that holds `partition`, if the broker said.
    pub fn shard_of(&self, partition: u32) -> Option<u16> {
        self.shards.get(partition as usize).copied().flatten()
    }
}

/// A handle to a broker: its connections (re-established when lost) and the metadata cache.
/// Cheap to clone; clones share both.
///
/// One `Client` can serve a producer and a long-polling consumer at once: fetches have a
/// connection of their own, so a long poll (up to `ConsumerConfig::fetch_wait_max`) never
/// holds up a produce, a commit or a group heartbeat sent meanwhile (the broker answers each
/// connection's requests in order).
///
/// Against a broker that says how many shards serve it (Metadata v2), the producer also opens
/// one connection per shard it writes to, and the consumer one per shard it reads from, each
/// steered to its shard (over TCP by its source port, [`skein_net::tcp`]; over QUIC by its
/// first connection id, [`skein_net::quic`]), and sends each partition's requests on the
/// connection of the partition's shard ([`Client::shard_connection`]): no request waits for a
/// hop between the broker's cores, no record is copied from one core to another, and the
/// network work of one client is spread over the cores that hold its partitions.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What a connection of the client carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Everything but fetches: produce, metadata, admin, groups.
    General,
    /// Fetch requests (long polls).
    Fetch,
}

/// A connection, made (again) by whoever finds it missing or closed.
type ConnectionSlot = tokio::sync::Mutex<Option<Arc<Connection>>>;

/// A shard's connection (or when making it last failed), with the broker address and shard
/// count it was made for.
type ShardSlot = tokio::sync::Mutex<Option<(String, u16, std::result::Result<Arc<Connection>, Instant>)>>;

/// How long a shard connection that could not be made is not tried again (its requests go on
/// the general connection meanwhile).
const SHARD_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    /// By [`Purpose`]: general, fetch.
    connections: [ConnectionSlot; 2],
    /// QUIC only: a connection per shard of the broker and purpose (a shard's long polls never
    /// hold up its produce requests), opened when first asked for.
    shard_connections: Mutex<HashMap<(u16, Purpose), Arc<ShardSlot>>>,
    /// How many shards serve the broker, once Metadata v2 said.
    shards: Mutex<Option<u16>>,
    topics: Mutex<HashMap<String, Arc<TopicInfo>>>,
    broker: Mutex<Option<ApiVersionsResponse>>,
    /// Counts the metadata answers that moved a partition to another shard or changed the
    /// shard count ([`Client::placement`]).
    placement: AtomicU64,
    /// Counts the metadata answers that changed or removed a cached topic
    /// ([`Client::topics_generation`]).
    topics_changed: AtomicU64,
}

/// Decodes a response body, mapping decode failures to [`ClientError::Protocol`].
pub(crate) fn decode<T>(
    body: &Bytes,
    f: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T> {
    let mut reader = Reader::new(body);
    let value = f(&mut reader).map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(value)
}

impl Client {
    /// Connects to the broker and performs the ApiVersions handshake. A refused or lost
    /// connection (a broker that is restarting) is tried again until `connect_timeout`.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                connections: [tokio::sync::Mutex::new(None), tokio::sync::Mutex::new(None)],
                shard_connections: Mutex::new(HashMap::new()),
                shards: Mutex::new(None),
                topics: Mutex::new(HashMap::new()),
                broker: Mutex::new(None),
                placement: AtomicU64::new(0),
                topics_changed: AtomicU64::new(0),
            }),
        };
        retry_until(deadline, || client.connection()).await?;
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The broker's limits and versions, learnt at the handshake.
    pub fn broker_info(&self) -> Option<ApiVersionsResponse> {
        self.inner.broker.lock().expect("not poisoned").clone()
    }

    /// The current general connection, reconnecting if it broke.
    pub async fn connection(&self) -> Result<Arc<Connection>> {
        self.connection_for(Purpose::General).await
    }

    /// The current connection for `purpose`, reconnecting if it broke (to the first
    /// bootstrap address that answers).
    pub async fn connection_for(&self, purpose: Purpose) -> Result<Arc<Connection>> {
        let mut slot = self.inner.connections[purpose as usize].lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.is_closed() {
                return Ok(connection.clone());
            }
        }
        let reconnect = slot.is_some();
        let config = &self.inner.config;
        let mut failure = None;
        for addr in config.bootstrap.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let connected = Connection::connect(
                addr,
                config.connect_timeout,
                config.request_timeout,
                config.in_flight_max,
                &config.transport,
                None,
            )
            .await;
            let connection = match connected {
                Ok(connection) => Arc::new(connection),
                Err(error) => {
                    tracing::debug!(addr, %error, "bootstrap address did not answer");
                    failure = Some(error);
                    continue;
                }
            };
            let versions = handshake(&connection, &config.client_id).await?;
            *self.inner.broker.lock().expect("not poisoned") = Some(versions);
            *slot = Some(connection.clone());
            if reconnect {
                self.refresh_after_reconnect(&connection).await;
            }
            return Ok(connection);
        }
        Err(failure.unwrap_or(ClientError::Config("no bootstrap address")))
    }

    /// The connection to send requests for a partition of `shard` on: when the broker said how
    /// many shards serve it and has more than one (and [`ClientConfig::connection_per_shard`]),
    /// a connection of that shard's own (opened on first use, steered by its source port over
    /// TCP or its first connection id over QUIC, to the broker of the general connection;
    /// opened again when lost, or when the general connection moved to another broker; over
    /// TCP the general connection itself when its own port steers it to that shard);
    /// otherwise (one shard, `None`, an older broker) the general connection. A shard
    /// connection that cannot be made falls back to the general connection (the broker then
    /// forwards), so a steering problem costs a hop, not the request.
    pub async fn shard_connection(&self, shard: Option<u16>) -> Result<Arc<Connection>> {
        self.shard_connection_for(shard, Purpose::General).await
    }

    /// Like [`Client::shard_connection`], for `purpose`: a shard's fetches (long polls) have
    /// connections of their own, as on the bootstrap broker, and fall back to the fetch
    /// connection.
    pub async fn shard_connection_for(
        &self,
        shard: Option<u16>,
        purpose: Purpose,
    ) -> Result<Arc<Connection>> {
        let general = self.connection_for(purpose).await?;
        let shards = *self.inner.shards.lock().expect("not poisoned");
        let (Some(shard), Some(shards)) = (shard, shards) else { return Ok(general) };
        if !self.routes_by_shard() || shard >= shards {
            return Ok(general);
        }
        // Over TCP the general connection's own port steers it to some shard: that shard's
        // requests need no second connection.
        if general.tcp_shard(usize::from(shards)) == Some(usize::from(shard)) {
            return Ok(general);
        }
        let slot = self
            .inner
            .shard_connections
            .lock()
            .expect("not poisoned")
            .entry((shard, purpose))
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        let addr = general.addr();
        match slot.as_ref().filter(|(at, of, _)| at == addr && *of == shards) {
            Some((_, _, Ok(connection))) if !connection.is_closed() => return Ok(connection.clone()),
            Some((_, _, Err(failed))) if failed.elapsed() < SHARD_RETRY_AFTER => return Ok(general),
            _ => {}
        }
        // A shard connection that was lost (not one never made, nor one of another broker):
        // the broker may have restarted with its partitions on other shards.
        let lost =
            matches!(slot.as_ref(), Some((at, _, Ok(connection))) if at == addr && connection.is_closed());
        let config = &self.inner.config;
        let connect = async {
            let connection = Arc::new(
                Connection::connect(
                    addr,
                    config.connect_timeout,
                    config.request_timeout,
                    config.in_flight_max,
                    &config.transport,
                    Some((usize::from(shard), usize::from(shards))),
                )
                .await?,
            );
            handshake(&connection, &config.client_id).await?;
            Ok::<_, ClientError>(connection)
        };
        match connect.await {
            Ok(connection) => {
                *slot = Some((addr.to_owned(), shards, Ok(connection.clone())));
                if lost {
                    self.refresh_after_reconnect(&connection).await;
                }
                Ok(connection)
            }
            Err(error) => {
                tracing::debug!(addr, shard, %error, "no connection of the shard; using the general one");
                *slot = Some((addr.to_owned(), shards, Err(Instant::now())));
                Ok(general)
            }
        }
    }

    /// Whether [`Client::shard_connection_for`] would answer now, without making a connection:
    /// no shard connection applies, the shard's is open, its last attempt failed less than
    /// `SHARD_RETRY_AFTER` ago (the general connection serves), or the general connection
    /// itself is not up (making that is the caller's business, as before). `false` while the
    /// shard's connection is being made or was never asked for.
    pub(crate) fn shard_connection_ready(&self, shard: Option<u16>, purpose: Purpose) -> bool {
        let shards = *self.inner.shards.lock().expect("not poisoned");
        let (Some(shard), Some(shards)) = (shard, shards) else { return true };
        if !self.routes_by_shard() || shard >= shards {
            return true;
        }
        let general = match self.inner.connections[purpose as usize].try_lock() {
            Ok(slot) => match slot.as_ref() {
                Some(connection) if !connection.is_closed() => {
                    if connection.tcp_shard(usize::from(shards)) == Some(usize::from(shard)) {
                        return true;
                    }
                    connection.addr().to_owned()
                }
                _ => return true,
            },
            Err(_) => return true,
        };
        let Some(slot) =
            self.inner.shard_connections.lock().expect("not poisoned").get(&(shard, purpose)).cloned()
        else {
            return false;
        };
        let Ok(slot) = slot.try_lock() else { return false };
        match slot.as_ref() {
            Some((at, of, state)) if *at == general && *of == shards => match state {
                Ok(connection) => !connection.is_closed(),
                Err(failed) => failed.elapsed() < SHARD_RETRY_AFTER,
            },
            _ => false,
        }
    }

    /// Sends a request and returns the response body (fetches on the fetch connection, the
    /// rest on the general one). If the connection is lost or refused (the broker restarts),
    /// it reconnects and sends the request again, for up to `retry_timeout`: every request
    /// that goes through here is safe to repeat (produce requests do not: the producer orders
    /// its own resends).
    pub async fn request(&self, request: &Request<Bytes>) -> Result<Bytes> {
        let purpose = if matches!(request, Request::Fetch(_)) { Purpose::Fetch } else { Purpose::General };
        let deadline = tokio::time::Instant::now() + self.inner.config.retry_timeout;
        retry_until(deadline, || async { self.connection_for(purpose).await?.request(request).await }).await
    }

    /// A fetch sent on the connection of the shard that holds its partitions (see
    /// [`Client::shard_connection_for`]; `None`: the fetch connection), reconnecting and sending
    /// it again after a lost connection as [`Client::request`] does.
    pub(crate) async fn fetch_on_shard(&self, shard: Option<u16>, request: &Request<Bytes>) -> Result<Bytes> {
        let deadline = tokio::time::Instant::now() + self.inner.config.retry_timeout;
        retry_until(deadline, || async {
            self.shard_connection_for(shard, Purpose::Fetch).await?.request(request).await
        })
        .await
    }

    /// Fetches metadata (`None`: every topic) and refreshes the cache with it.
    pub async fn metadata(&self, topics: Option<Vec<String>>) -> Result<MetadataResponse> {
        let request = Request::Metadata(MetadataRequest { topics });
        let deadline = tokio::time::Instant::now() + self.inner.config.retry_timeout;
        retry_until(deadline, || async { self.metadata_on(&*self.connection().await?, &request).await }).await
    }

    /// One Metadata request on `connection`, its answer taken into the cache.
    async fn metadata_on(
        &self,
        connection: &Connection,
        request: &Request<Bytes>,
    ) -> Result<MetadataResponse> {
        let version = connection.version(ApiKey::Metadata)?;
        let body = connection.request(request).await?;
        let response = decode(&body, |r| MetadataResponse::decode(r, version))?;
        self.absorb(&response);
        Ok(response)
    }

    /// After a lost connection was made again (the broker restarted, perhaps with another
    /// number of shards, so its partitions sit on other shards), the cached topics are asked
    /// for once more on the new connection, so that partitions are routed to the shards that
    /// hold them now ([`Client::placement`]). A failure leaves the cache as it was (the next
    /// request that needs metadata asks).
    async fn refresh_after_reconnect(&self, connection: &Connection) {
        let names: Vec<String> = self.inner.topics.lock().expect("not poisoned").keys().cloned().collect();
        if names.is_empty() {
            return;
        }
        let request = Request::Metadata(MetadataRequest { topics: Some(names) });
        if let Err(error) = self.metadata_on(connection, &request).await {
            tracing::debug!(%error, "metadata after a reconnect");
        }
    }

    /// Takes a metadata answer into the cache (the shard count, each topic's partitions,
    /// configs and shards), counting a change of placement.
    fn absorb(&self, response: &MetadataResponse) {
        let (mut moved, mut changed) = (false, false);
        if let Some(shards) = response.brokers.first().and_then(|b| b.shards) {
            let mut known = self.inner.shards.lock().expect("not poisoned");
            moved |= known.is_some_and(|known| known != shards);
            *known = Some(shards);
        }
        let mut cache = self.inner.topics.lock().expect("not poisoned");
        for topic in &response.topics {
            if topic.error.is_ok() {
                let info = Arc::new(TopicInfo {
                    name: topic.name.clone(),
                    partitions: topic.partitions.len() as u32,
                    configs: topic.configs.clone(),
                    shards: {
                        let mut shards = vec![None; topic.partitions.len()];
                        for p in &topic.partitions {
                            if let Some(slot) = shards.get_mut(p.partition as usize) {
                                *slot = p.shard;
                            }
                        }
                        shards
                    },
                });
                let old = cache.insert(topic.name.clone(), info.clone());
                moved |= old.as_ref().is_some_and(|old| old.shards != info.shards);
                changed |=
                    old.is_some_and(|old| old.partitions != info.partitions || old.configs != info.configs);
            } else {
                changed |= cache.remove(&topic.name).is_some();
            }
        }
        if moved {
            self.inner.placement.fetch_add(1, Ordering::Release);
        }
        if changed {
            self.inner.topics_changed.fetch_add(1, Ordering::Release);
        }
    }

    /// How many metadata answers changed a cached topic (its partition count or its
    /// settings) or said it is gone (deleted, perhaps made anew): a producer that keeps its
    /// own copy of a topic's partition count and record limit looks them up again when this
    /// moved.
    pub(crate) fn topics_generation(&self) -> u64 {
        self.inner.topics_changed.load(Ordering::Acquire)
    }

    /// How many times the broker's placement of partitions on shards changed as the client
    /// learnt it: a sender that cached a partition's shard looks it up again when this moved.
    pub(crate) fn placement(&self) -> u64 {
        self.inner.placement.load(Ordering::Acquire)
    }

    /// A topic's metadata, from the cache or the broker.
    pub async fn topic(&self, name: &str) -> Result<Arc<TopicInfo>> {
        if let Some(info) = self.inner.topics.lock().expect("not poisoned").get(name) {
            return Ok(info.clone());
        }
        self.refresh_topic(name).await
    }

    /// Asks the broker again (after an error saying the metadata moved).
    pub async fn refresh_topic(&self, name: &str) -> Result<Arc<TopicInfo>> {
        let response = self.metadata(Some(vec![name.to_owned()])).await?;
        match response.topics.into_iter().find(|t| t.name == name) {
            Some(topic) if topic.error.is_ok() => {
                Ok(self.inner.topics.lock().expect("not poisoned")[name].clone())
            }
            Some(topic) if topic.error == ErrorCode::UnknownTopicOrPartition => {
                Err(ClientError::UnknownTopic(name.to_owned()))
            }
            Some(topic) => Err(ClientError::broker(topic.error, format!("metadata of {name}"))),
            None => Err(ClientError::UnknownTopic(name.to_owned())),
        }
    }

    /// Whether requests for partitions go on connections of their shards: to a broker that
    /// said it has more than one, unless [`ClientConfig::connection_per_shard`] is off
    /// ([`Client::shard_connection`]).
    pub fn routes_by_shard(&self) -> bool {
        self.inner.config.connection_per_shard
            && self.inner.shards.lock().expect("not poisoned").is_some_and(|shards| shards > 1)
    }

    /// A topic's metadata if the cache holds it.
    pub(crate) fn cached_topic(&self, name: &str) -> Option<Arc<TopicInfo>> {
        self.inner.topics.lock().expect("not poisoned").get(name).cloned()
    }

    /// Drops a topic from the cache (this client deleted or changed it), so that producers
    /// sharing the client look it up again.
    pub(crate) fn forget_topic(&self, name: &str) {
        if self.inner.topics.lock().expect("not poisoned").remove(name).is_some() {
            self.inner.topics_changed.fetch_add(1, Ordering::Release);
        }
    }
}

/// The ApiVersions handshake: asks at this client's newest version of ApiVersions; a broker
/// that does not speak it either refuses the frame (an older broker: asked again at version 0)
/// or answers at version 0 with `UnsupportedVersion` and the versions it speaks (asked again at
/// the highest both speak). An answer with an error fails the handshake; otherwise the
/// connection sends each API at the version negotiated from it.
async fn handshake(connection: &Connection, client_id: &str) -> Result<ApiVersionsResponse> {
    let request = Request::ApiVersions(ApiVersionsRequest { client_id: client_id.to_owned() });
    let mut version = ApiKey::ApiVersions.versions().1;
    for _ in 0..2 {
        let body = match connection.submit_at(&request, version).await?.await {
            Err(error) if error.code() == Some(ErrorCode::UnsupportedVersion) && version > 0 => {
                version = 0;
                continue;
            }
            other => other?,
        };
        // A refusal of the version comes as a version-0 body.
        let answered = decode(&body, |r| ApiVersionsResponse::decode(r, version))
            .or_else(|_| decode(&body, |r| ApiVersionsResponse::decode(r, 0)))?;
        if answered.error == ErrorCode::UnsupportedVersion {
            match answered
                .versions_of(ApiKey::ApiVersions)
                .and_then(|theirs| ApiKey::ApiVersions.negotiate(theirs))
            {
                Some(common) if common != version => {
                    version = common;
                    continue;
                }
                _ => {}
            }
        }
        if !answered.error.is_ok() {
            return Err(ClientError::broker(answered.error, "handshake"));
        }
        connection.set_versions(&answered);
        return Ok(answered);
    }
    Err(ClientError::broker(ErrorCode::UnsupportedVersion, "handshake: no version of ApiVersions in common"))
}

/// Runs `attempt` until it succeeds, fails with something other than a lost or refused
/// connection, or `deadline` passes; backs off 50 ms, doubling up to 1 s, in between.
async fn retry_until<T, F, Fut>(deadline: tokio::time::Instant, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match attempt().await {
            Err(error)
                if error.is_connection_failure() && tokio::time::Instant::now() + backoff < deadline =>
            {
                tracing::debug!(%error, ?backoff, "no broker connection; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            outcome => return outcome,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

//! The gRPC client a replication actor uses to reach its peer's `Replicator` service.
//!
//! Two lazily connected channels per peer, both reconnecting by themselves (so a node starts
//! while its peers are down and picks them up when they return): one for replication and reads,
//! whose calls are bounded by the replication deadline, and one for anti-entropy, whose digests
//! and bucket pulls may take longer and must not queue in front of replication.
//!
//! Batches go over one long-lived `ReplicateStream` per peer, a batch and then its ack, rather
//! than one `ReplicateBatch` call each: a call costs the headers, a new HTTP/2 stream and a task
//! on both sides, a stream message costs a frame (A/B: put 1.14-1.30x faster). A stream that
//! fails in any way is dropped and the next batch opens a new one; and a batch that finds the
//! stream busy (an anti-entropy push beside the actor's own batch) goes as a `ReplicateBatch`
//! call of its own rather than wait.
//!
//! Every call says which node sends it (the [`SENDER_HEADER`] metadata), so that a node reached
//! under a name its configuration check could not see through (`localhost:5001` for its own
//! `127.0.0.1:5001`), or a second node given the same id, refuses it instead of counting
//! towards the quorum as a separate copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use kvstore_actors::membership::RingState;
use kvstore_actors::merge::Pairs;
use kvstore_actors::peer::Pulled;
use kvstore_actors::placement::PartitionSet;
use kvstore_actors::{Clock, Entry, PeerClient, PeerError, Write};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{BinaryMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Request, Status, Streaming};

use crate::config::ClusterToken;
use crate::error::Error;
use crate::net::status_reason;
use crate::pb::replicator_client::ReplicatorClient;
use crate::pb::{
    Ack, DigestRequest, GetRingRequest, Key, KeyValue, PullRequest, ScanRequest, WriteBatch,
};
use crate::wire;

/// Bound on one anti-entropy call (a digest or a bucket pull).
const BULK_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The metadata key under which a node names itself on every call to a peer's Replicator.
/// Binary (`-bin`), since a node id may be any UTF-8.
pub const SENDER_HEADER: &str = "kvstore-sender-bin";

/// The metadata key under which a node of a ring sends its ring's fingerprint (see
/// `Placement::fingerprint`), which the peer checks against its own.
pub const RING_HEADER: &str = "kvstore-ring";

/// The metadata key under which a node sends its cluster's name (`--cluster-name`), which the
/// peer checks against its own.
pub const CLUSTER_HEADER: &str = "kvstore-cluster";

/// The metadata key under which a node sends the cluster's token, when it has one.
pub const TOKEN_HEADER: &str = "kvstore-token-bin";

/// A node's ring fingerprint as it is now (see `Placement::fingerprint`), shared by every
/// link to a peer, which sends it, and the Replicator, which checks callers' against it;
/// replaced when the ring changes. `None` when the node holds every key of a first ring.
pub type RingTag = Arc<arc_swap::ArcSwapOption<tonic::metadata::AsciiMetadataValue>>;

/// A [`RingTag`] holding `fingerprint`.
pub fn ring_tag(fingerprint: Option<String>) -> RingTag {
    let tag = RingTag::default();
    set_ring_tag(&tag, fingerprint);
    tag
}

/// Puts `fingerprint` in `tag`.
pub fn set_ring_tag(tag: &RingTag, fingerprint: Option<String>) {
    tag.store(fingerprint.map(|f| {
        Arc::new(
            f.parse()
                .expect("a fingerprint is ASCII digits, letters and dots"),
        )
    }));
}

/// The node id a Replicator call says it comes from, if it says.
pub fn sender_of(metadata: &MetadataMap) -> Option<Vec<u8>> {
    let value = metadata.get_bin(SENDER_HEADER)?;
    value.to_bytes().ok().map(|b| b.to_vec())
}

/// Adds [`SENDER_HEADER`], and [`TOKEN_HEADER`] if the cluster has a token, to every call.
#[derive(Clone)]
pub struct Sender {
    node_id: BinaryMetadataValue,
    token: Option<BinaryMetadataValue>,
    ring: RingTag,
    cluster: Option<tonic::metadata::AsciiMetadataValue>,
}

/// Without the token: a `Debug` of a peer client must not print the secret.
impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("node_id", &self.node_id)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Interceptor for Sender {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // A node asks for a peer's ring when its own may be behind (it restarted after missing
        // changes): sent with it, a ring two versions behind would be refused, and the node
        // could never catch up.
        let asking_for_ring = (request.extensions().get::<tonic::GrpcMethod>())
            .is_some_and(|m| m.method() == "GetRing");
        let metadata = request.metadata_mut();
        metadata.insert_bin(SENDER_HEADER, self.node_id.clone());
        if let Some(token) = &self.token {
            metadata.insert_bin(TOKEN_HEADER, token.clone());
        }
        if let (false, Some(ring)) = (asking_for_ring, &*self.ring.load()) {
            metadata.insert(RING_HEADER, (**ring).clone());
        }
        if let Some(cluster) = &self.cluster {
            metadata.insert(CLUSTER_HEADER, cluster.clone());
        }
        Ok(request)
    }
}

type Client = ReplicatorClient<InterceptedService<Channel, Sender>>;

/// What every peer link of a node shares.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This node's id, sent on every call.
    pub node_id: String,
    /// The cluster's token, if it has one, sent on every call.
    pub token: Option<ClusterToken>,
    /// The fingerprint of this node's ring, sent on every call.
    pub ring: RingTag,
    /// The cluster's name (`--cluster-name`), sent on every call.
    pub cluster: String,
    pub connect_timeout: Duration,
    /// Bounds each replication call.
    pub call_timeout: Duration,
    /// The node's own message limit.
    pub max_message_bytes: usize,
    /// This node's clock, which the peer's answers are measured against.
    pub clock: Arc<Clock>,
    /// How to call peers over TLS, if the cluster has a CA.
    pub tls: Option<ClientTlsConfig>,
}

/// Connection to one peer.
#[derive(Clone, Debug)]
pub struct GrpcPeer {
    client: Client,
    bulk: Client,
    clock: Arc<Clock>,
    /// How far the peer's clock is ahead of ours, in nanoseconds, as last measured; `i64::MIN`
    /// before the first measurement. Shared by clones.
    offset: Arc<AtomicI64>,
    /// The peer's own id, once it has said it: always taken in versions (see `NodeId::known`),
    /// so a stranger who fills the node-id allowance cannot lock the cluster's nodes out.
    peer_id: Arc<std::sync::OnceLock<kvstore_actors::NodeId>>,
    /// The open replication stream, if any. Shared by clones, like the channels.
    stream: Arc<Mutex<Option<BatchStream>>>,
    /// Bounds one batch's round trip over the stream, as the channel bounds a call.
    call_timeout: Duration,
    /// Most bytes of writes per batch: half the message limit, so that a batch always fits it
    /// (a batch's writes take less room encoded than `write_size` counts).
    max_batch_bytes: usize,
}

/// An open `ReplicateStream`: batches go in at one end, their acks come out of the other.
#[derive(Debug)]
struct BatchStream {
    batches: mpsc::Sender<WriteBatch>,
    acks: Streaming<Ack>,
}

fn client(
    addr: &str,
    sender: &Sender,
    connect_timeout: Duration,
    call_timeout: Duration,
    max_message_bytes: usize,
    tls: Option<&ClientTlsConfig>,
) -> Result<Client, Error> {
    let channel = crate::net::lazy_channel(addr, connect_timeout, call_timeout, tls)?;
    Ok(ReplicatorClient::with_interceptor(channel, sender.clone())
        .max_encoding_message_size(max_message_bytes)
        .max_decoding_message_size(max_message_bytes))
}

impl GrpcPeer {
    /// Clients for the peer at `addr` (`host:port`).
    pub fn new(addr: &str, settings: &PeerSettings) -> Result<Self, Error> {
        let sender = Sender {
            node_id: BinaryMetadataValue::from_bytes(settings.node_id.as_bytes()),
            token: (settings.token.as_ref()).map(|t| BinaryMetadataValue::from_bytes(t.sent())),
            ring: settings.ring.clone(),
            // Letters, digits, '-', '_' and '.' (the flag's rule): valid ASCII metadata.
            cluster: settings.cluster.parse().ok(),
        };
        let max = settings.max_message_bytes;
        let connect = settings.connect_timeout;
        let tls = settings.tls.as_ref();
        Ok(Self {
            client: client(addr, &sender, connect, settings.call_timeout, max, tls)?,
            bulk: client(addr, &sender, connect, BULK_CALL_TIMEOUT, max, tls)?,
            clock: settings.clock.clone(),
            offset: Arc::new(AtomicI64::new(i64::MIN)),
            peer_id: Arc::default(),
            stream: Arc::new(Mutex::new(None)),
            call_timeout: settings.call_timeout,
            max_batch_bytes: (max / 2).min(kvstore_actors::peer::BATCH_BYTES),
        })
    }

    /// The peer's ring, and any change of it under way.
    pub async fn get_ring(&self) -> Result<RingState, PeerError> {
        let reply = self.client.clone().get_ring(GetRingRequest {}).await;
        ring_state(reply.map_err(peer_error)?.into_inner())
    }

    /// Offers the peer a newer ring; it answers with the ring it holds after.
    pub async fn push_ring(&self, state: &RingState) -> Result<RingState, PeerError> {
        let request = crate::pb::RingState {
            state: state.to_bytes(),
        };
        let reply = self.client.clone().push_ring(request).await;
        ring_state(reply.map_err(peer_error)?.into_inner())
    }

    /// Asks the peer, the ring's claimant, to change the ring for `node` (and, for a remove,
    /// `also`).
    pub async fn change_ring(
        &self,
        kind: crate::pb::ring_change::Kind,
        node: &str,
        also: &[String],
    ) -> Result<RingState, PeerError> {
        let request = crate::pb::RingChange {
            kind: kind.into(),
            node: node.to_owned(),
            also: also.to_vec(),
        };
        // A change waits for the claimant to tell every member, each within the call timeout.
        let reply = self.bulk.clone().change_ring(request).await;
        // The asking node answers with the claimant's own code (a refusal stays
        // FAILED_PRECONDITION, a bad name INVALID_ARGUMENT), so those two keep only its words.
        let reply = reply.map_err(|status| match status.code() {
            Code::FailedPrecondition => PeerError::Refused(status.message().to_owned()),
            Code::InvalidArgument => PeerError::Rejected(status.message().to_owned()),
            _ => peer_error(status),
        });
        ring_state(reply?.into_inner())
    }

    /// Takes what an answer of the peer says about it: its id, and its clock reading `theirs`
    /// on a call sent when our clock read `sent` (see `measure`).
    fn learn(&self, node_id: &str, sent: u64, theirs: u64) {
        if !node_id.is_empty() && self.peer_id.get().is_none() {
            let _ = self.peer_id.set(kvstore_actors::NodeId::known(node_id));
        }
        self.measure(sent, theirs);
    }

    /// Takes the peer's clock reading `theirs` from an answer to a call sent when our clock
    /// read `sent`: the peer read it, give or take half the round trip, at its middle.
    ///
    /// An answer that took longer than the clock bound itself is not taken: it could be off by
    /// half its round trip, and one held up by a cut link, its packets resent seconds later,
    /// would make a good clock look seconds off and stop a node taking writes.
    fn measure(&self, sent: u64, theirs: u64) {
        if theirs == 0 {
            return;
        }
        let now = self.clock.physical();
        let round_trip = now.saturating_sub(sent);
        if round_trip > kvstore_actors::clock::ntp_duration(self.clock.max_offset()) {
            tracing::debug!(
                round_trip = ?kvstore_actors::clock::duration_from_ntp(round_trip),
                "peer's clock reading not taken: its answer took too long to tell"
            );
            return;
        }
        let middle = sent / 2 + now / 2;
        let ahead = (theirs as i128 - middle as i128).clamp(i64::MIN as i128 + 1, i64::MAX as i128);
        let nanos = kvstore_actors::clock::nanos_from_ntp(ahead as i64);
        self.offset
            .store(nanos.max(i64::MIN + 1), Ordering::Relaxed);
    }

    /// Sends the batch over the replication stream, opening one if there is none, and waits for
    /// its ack. The stream is taken out of its slot while the batch is out and put back only
    /// after its ack, so that it never carries two batches at once, whoever the callers are:
    /// after a failure, a timeout or a cancelled call nothing says which ack the next message
    /// would be, so such a stream is dropped, never trusted with another batch.
    async fn over_stream(
        &self,
        slot: &mut Option<BatchStream>,
        batch: impl Fn() -> WriteBatch,
    ) -> Result<(), PeerError> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let within = async |attempt| {
            (tokio::time::timeout_at(deadline, attempt).await).unwrap_or(Err(PeerError::TimedOut))
        };
        let reused = slot.take();
        let was_open = reused.is_some();
        let mut result = within(self.exchange(reused, batch())).await;
        if matches!(result, Err(PeerError::Unreachable(_))) && was_open {
            // A stream that sat open may have ended with its peer's restart, which we learn
            // only now. That says nothing about the peer: try once more on a new stream
            // (within the same deadline; a write applied twice is applied once).
            result = within(self.exchange(None, batch())).await;
        }
        *slot = Some(result?);
        Ok(())
    }

    /// One batch and its ack over `open`, or over a new stream if `None`. Returns the stream,
    /// still open, when the batch was acked.
    async fn exchange(
        &self,
        open: Option<BatchStream>,
        batch: WriteBatch,
    ) -> Result<BatchStream, PeerError> {
        let sent = self.clock.physical();
        let mut open = match open {
            Some(open) => {
                if open.batches.send(batch).await.is_err() {
                    return Err(PeerError::Unreachable("replication stream closed".into()));
                }
                open
            }
            None => {
                // A buffer of one is enough, since a stream carries one batch at a time; the
                // first batch is queued before the call starts, so it goes out right behind
                // the headers instead of a round trip after them.
                let (batches, rx) = mpsc::channel(1);
                batches
                    .try_send(batch)
                    .expect("a new channel has room for one");
                let acks = (self.client.clone())
                    .replicate_stream(ReceiverStream::new(rx))
                    .await
                    .map_err(peer_error)?
                    .into_inner();
                BatchStream { batches, acks }
            }
        };
        match open.acks.message().await {
            Ok(Some(ack)) => {
                self.learn(&ack.node_id, sent, ack.clock);
                ack_result(ack).map(|()| open)
            }
            Ok(None) => Err(PeerError::Unreachable("replication stream ended".into())),
            Err(status) => Err(peer_error(status)),
        }
    }

    /// The batch as one `ReplicateBatch` call.
    async fn call(&self, batch: WriteBatch) -> Result<(), PeerError> {
        let sent = self.clock.physical();
        match self.client.clone().replicate_batch(batch).await {
            Ok(ack) => {
                let ack = ack.into_inner();
                self.learn(&ack.node_id, sent, ack.clock);
                ack_result(ack)
            }
            Err(status) => Err(peer_error(status)),
        }
    }
}

fn ack_result(ack: Ack) -> Result<(), PeerError> {
    if ack.ok {
        Ok(())
    } else {
        Err(PeerError::Rejected(ack.message))
    }
}

/// Only an answer that says the peer will never take these writes is a refusal (not retried).
/// An answer that says it takes nothing from this node (another cluster token, a shared node
/// id: the Replicator's interceptor refuses before looking at the call) is `Refused`, held and
/// retried with backoff like an unreachable peer's, for when the setup is fixed. Anything else
/// leaves the writes held for redelivery too: an INTERNAL from a connection reset, an
/// UNAVAILABLE from a failing disk, a RESOURCE_EXHAUSTED from a full one (disks get freed).
fn peer_error(status: Status) -> PeerError {
    if crate::net::timed_out(&status) {
        return PeerError::TimedOut;
    }
    match status.code() {
        code @ (Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated) => {
            PeerError::Refused(format!("{code:?}: {}", status.message()))
        }
        code @ (Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented) => {
            PeerError::Rejected(format!("{code:?}: {}", status.message()))
        }
        _ => PeerError::Unreachable(status_reason(&status)),
    }
}

/// A ring state a peer sent, checked.
fn ring_state(sent: crate::pb::RingState) -> Result<RingState, PeerError> {
    RingState::from_bytes(&sent.state)
        .map_err(|e| PeerError::Rejected(format!("sent a bad ring: {e}")))
}

impl PeerClient for GrpcPeer {
    fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    async fn replicate(&self, writes: &[Write]) -> Result<(), PeerError> {
        let batch = || WriteBatch {
            writes: writes.iter().map(KeyValue::from).collect(),
        };
        match self.stream.try_lock() {
            Ok(mut slot) => self.over_stream(&mut slot, batch).await,
            Err(_busy) => self.call(batch()).await,
        }
    }

    async fn digest(&self, buckets: u32, scope: &PartitionSet) -> Result<Vec<u64>, PeerError> {
        let sent = self.clock.physical();
        let request = DigestRequest {
            buckets,
            partitions: wire::partitions_to_bytes(scope),
        };
        let reply = self.bulk.clone().digest(request).await;
        let reply = reply.map_err(peer_error)?.into_inner();
        self.learn(&reply.node_id, sent, reply.clock);
        Ok(reply.sums)
    }

    fn clock_offset(&self) -> Option<i64> {
        Some(self.offset.load(Ordering::Relaxed)).filter(|&o| o != i64::MIN)
    }

    async fn pull(
        &self,
        buckets: u32,
        which: Vec<u32>,
        scope: &PartitionSet,
    ) -> Result<Pulled, PeerError> {
        let request = PullRequest {
            buckets,
            which,
            partitions: wire::partitions_to_bytes(scope),
        };
        let stream = self
            .bulk
            .clone()
            .pull(request)
            .await
            .map_err(peer_error)?
            .into_inner();
        // One entry we cannot take (a node id past our bound, say) must not stop the rest of
        // the repair: skip it, say so (once a pull), and go on.
        let mut warned = false;
        let writes = stream.filter_map(move |kv| match kv.map_err(peer_error) {
            Err(error) => Some(Err(error)),
            Ok(kv) => match wire::checked(kv) {
                Ok(write) => Some(Ok(write)),
                Err(error) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(%error, "anti-entropy: skipped an entry a peer sent");
                    }
                    None
                }
            },
        });
        Ok(Box::pin(writes))
    }

    async fn scan(&self, scope: &PartitionSet) -> Result<Pairs, PeerError> {
        let request = ScanRequest {
            partitions: wire::partitions_to_bytes(scope),
        };
        let stream = self
            .bulk
            .clone()
            .scan(request)
            .await
            .map_err(peer_error)?
            .into_inner();
        let pairs = stream.map(|kv| kv.map(|kv| (kv.key, kv.value)).map_err(peer_error));
        Ok(Box::pin(pairs))
    }

    async fn read(&self, key: String) -> Result<Option<Entry>, PeerError> {
        let request = Key {
            key,
            ..Default::default()
        };
        let kv = self
            .client
            .clone()
            .read(request)
            .await
            .map_err(peer_error)?
            .into_inner();
        wire::kv_to_entry(kv).map_err(|e| PeerError::Rejected(format!("sent a bad entry: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_fit_the_message_limit() {
        let peer = |max| {
            let settings = PeerSettings {
                node_id: "node1".into(),
                token: None,
                ring: RingTag::default(),
                cluster: "kvstore".into(),
                connect_timeout: Duration::from_secs(1),
                call_timeout: Duration::from_secs(1),
                max_message_bytes: max,
                clock: Arc::new(Clock::new(kvstore_actors::NodeId::new("node1").unwrap())),
                tls: None,
            };
            GrpcPeer::new("127.0.0.1:9", &settings)
                .unwrap()
                .max_batch_bytes()
        };
        // A node with `--max-value-bytes 1000`: its messages hold 66 KiB at most.
        assert_eq!(peer(66_560), 33_280);
        // The default limits allow the full batch size.
        let default = crate::config::Limits::default().max_message_bytes();
        assert_eq!(peer(default), kvstore_actors::peer::BATCH_BYTES);
    }

    #[tokio::test]
    async fn a_clock_reading_is_taken_only_from_an_answer_within_the_bound() {
        let settings = PeerSettings {
            node_id: "node1".into(),
            token: None,
            ring: RingTag::default(),
            cluster: "kvstore".into(),
            connect_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(1),
            max_message_bytes: 1 << 20,
            clock: Arc::new(Clock::new(kvstore_actors::NodeId::new("node1").unwrap())),
            tls: None,
        };
        let peer = GrpcPeer::new("127.0.0.1:9", &settings).unwrap();
        let ntp = kvstore_actors::clock::ntp_duration;
        let now = settings.clock.physical();
        // An answer held up for 6 s, read by a good clock as it left: not taken.
        peer.measure(now - ntp(Duration::from_secs(6)), now);
        assert_eq!(peer.clock_offset(), None);
        // A quick answer from a clock 2 s ahead: taken, give or take the quick round trip.
        peer.measure(
            now - ntp(Duration::from_millis(1)),
            now + ntp(Duration::from_secs(2)),
        );
        let ahead = peer.clock_offset().expect("taken");
        assert!((1_990_000_000..=2_010_000_000).contains(&ahead), "{ahead}");
        // And a slow one after it leaves that reading alone.
        peer.measure(now - ntp(Duration::from_secs(3)), now);
        assert_eq!(peer.clock_offset(), Some(ahead));
    }
}

//! `kvstore.v1.Replicator`: where peers deliver their writes, and the internal calls of
//! anti-entropy (digests, bucket pulls) and quorum reads.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kvstore_actors::{NodeId, Write};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status, Streaming};

use kvstore_actors::membership::RingState;
use kvstore_actors::placement::Fingerprint;

use crate::config::{ClusterToken, Limits};
use crate::error::Error;
use crate::pb::replicator_server::Replicator;
use crate::pb::{
    Ack, DigestReply, DigestRequest, GetRingRequest, Key, KeyValue, PullRequest, RingChange,
    ScanRequest, WriteBatch,
};
use crate::service::Starting;
use crate::service::list::{ListBounds, ListStream};
use crate::service::request_errors;
use crate::wire;

/// What a node says of its ring while it starts.
pub const STARTING: &str = "this node is starting";

/// Most buckets a digest may ask for: 512 KiB of sums.
const MAX_BUCKETS: u32 = 65_536;

/// The Replicator service: a handle to the node's actors, the input limits, and the node's
/// shutdown signal (which ends the peers' replication streams).
#[derive(Clone)]
pub struct ReplicatorService {
    node: Starting,
    /// This node's id, which every answer carries (see `Ack.node_id`).
    node_id: String,
    limits: Limits,
    /// The node's bound on Lists, which its share of a ring's Lists counts against.
    lists: ListBounds,
    stopping: watch::Receiver<bool>,
    /// The node's part in ring changes.
    members: std::sync::Arc<crate::membership::Members>,
}

impl ReplicatorService {
    /// `stopping` turns true when the node begins to shut down.
    pub fn new(
        node: Starting,
        node_id: String,
        limits: Limits,
        lists: ListBounds,
        stopping: watch::Receiver<bool>,
        members: std::sync::Arc<crate::membership::Members>,
    ) -> Self {
        Self {
            node_id,
            node,
            limits,
            lists,
            stopping,
            members,
        }
    }

    /// The node's ring, as sent: at once, even while the node starts, so that nodes starting
    /// together do not wait on each other. A starting node answers FAILED_PRECONDITION, not
    /// UNAVAILABLE: the caller (a claimant checking that a joining node answers at its
    /// address) learns that a node is there.
    fn ring(&self) -> Result<crate::pb::RingState, Error> {
        let node = (self.node.get()).ok_or_else(|| Error::FailedPrecondition(STARTING.into()))?;
        let state = (node.ring_state())
            .ok_or_else(|| Error::FailedPrecondition("this node has no ring".into()))?;
        Ok(crate::pb::RingState {
            state: state.to_bytes(),
        })
    }

    /// A replicated write, checked like a client's: a Replicate is a public RPC like any other.
    /// The limits are checked first: a write refused for its size must not use up one of the
    /// node ids the node will ever accept (see `MAX_NODE_IDS`).
    fn check(&self, kv: &KeyValue) -> Result<(), Error> {
        self.limits.check_key(&kv.key)?;
        self.limits.check_value(&kv.value)?;
        wire::check_replicated(kv)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<Ack, Status> {
        let n = writes.len();
        let changed = self
            .node
            .node()
            .await
            .apply(writes)
            .await
            .map_err(Error::from)?;
        Ok(Ack {
            ok: true,
            message: format!("applied {changed} of {n}"),
            clock: self.node.node().await.clock().physical(),
            node_id: self.node_id.clone(),
            ..Ack::default()
        })
    }

    /// A batch is taken whole or not at all: one bad write refuses the batch, and every write
    /// is checked before any is converted (see `check`).
    async fn apply_batch(&self, batch: WriteBatch) -> Result<Ack, Status> {
        for kv in &batch.writes {
            self.check(kv)?;
        }
        let node_ids =
            (batch.writes.iter()).filter_map(|kv| Some(kv.version.as_ref()?.node_id.as_str()));
        NodeId::room_for(node_ids).map_err(|e| Error::ResourceExhausted(e.to_string()))?;
        let writes = (batch.writes.into_iter())
            .map(wire::checked_into_write)
            .collect::<Result<Vec<_>, _>>()?;
        self.apply(writes).await
    }
}

/// Checks who calls the Replicator, before any handler runs.
///
/// With the cluster's CA (`--tls-ca`), a call over a connection without a client certificate
/// is refused (UNAUTHENTICATED); one with a certificate from anywhere else never got past the
/// TLS handshake. With a cluster token, a call without one of its tokens is refused too. Only
/// the cluster's nodes may replicate writes in or read the data out through anti-entropy.
///
/// A call that says it comes from this very node is refused (FAILED_PRECONDITION): the node is
/// listed as its own peer under another address, or another node has its id. Either way a
/// write "confirmed" there would count twice (or tie-break wrongly), so the sender must see a
/// refusal, not an ack. Calls that name no sender (a Replicate from a client of the original Go
/// system's proto) pass this check.
#[derive(Clone, Debug)]
pub struct SenderCheck {
    own_id: String,
    /// This node's ring's fingerprint; `None` when it holds every key of a first ring.
    ring: crate::peer::RingTag,
    /// Whether the node has started: until then its ring is not known (it may be joining
    /// one), and callers' rings are not checked.
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
    token: Option<ClusterToken>,
    /// Whether the caller must have presented a certificate the TLS layer checked against
    /// the cluster's CA.
    needs_certificate: bool,
    /// This node's cluster name, if callers' are checked against it.
    cluster: Option<String>,
}

impl SenderCheck {
    pub fn new(own_id: String, token: Option<ClusterToken>, needs_certificate: bool) -> Self {
        Self {
            own_id,
            ring: crate::peer::RingTag::default(),
            started: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            token,
            needs_certificate,
            cluster: None,
        }
    }

    /// Also refuses callers that say they belong to a cluster of another name. One that says
    /// none (an older node, a client of the original proto) is let in.
    pub fn with_cluster(mut self, name: String) -> Self {
        self.cluster = Some(name);
        self
    }

    fn check_cluster(&self, request: &Request<()>) -> Result<(), Status> {
        let (Some(ours), Some(theirs)) = (
            &self.cluster,
            request.metadata().get(crate::peer::CLUSTER_HEADER),
        ) else {
            return Ok(());
        };
        let theirs = theirs.to_str().unwrap_or("(not ASCII)");
        if theirs == ours {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "the caller belongs to cluster '{theirs}', this node to '{ours}' (--cluster-name): \
             a node takes no calls from another cluster's nodes"
        ))
        .into())
    }

    /// Also checks that a caller that holds only some keys has the same ring as this node.
    pub fn with_ring(
        mut self,
        ring: crate::peer::RingTag,
        started: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        self.ring = ring;
        self.started = started;
        self
    }

    /// A caller that sends a ring must have this node's, or be at another point of a change
    /// of it (see `Fingerprint::conflicts_with`). One that sends none (a node holding every
    /// key, an older one, a client of the original proto) is let in: it sends writes wherever
    /// it sends them, and this node keeps what it is sent.
    fn check_ring(&self, request: &Request<()>) -> Result<(), Status> {
        let Some(theirs) = request.metadata().get(crate::peer::RING_HEADER) else {
            return Ok(());
        };
        if !self.started.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let theirs = theirs.to_str().unwrap_or("(not ASCII)");
        let ours = self.ring.load();
        let ours = (ours.as_ref()).map_or(crate::membership::EVERYWHERE, |r| {
            r.to_str().expect("set from a fingerprint")
        });
        if !Fingerprint::parse(theirs).conflicts_with(&Fingerprint::parse(ours)) {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "the caller's ring ({theirs}: copies x members-hash) is not this node's ({ours}): \
             give every node the same --replicas, and name each node by the same address \
             everywhere (its --advertise, and the others' --peer)"
        ))
        .into())
    }
}

impl Interceptor for SenderCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        // The handshake already checked any certificate against the CA; what is left to
        // see is that there was one.
        if self.needs_certificate && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Error::Unauthenticated(
                "this node's Replicator takes calls only from the cluster's nodes: the caller \
                 presented no certificate from the cluster's CA (--tls-ca)"
                    .into(),
            )
            .into());
        }
        if let Some(token) = &self.token {
            let valid = token.admits(request.metadata());
            if !valid {
                return Err(Error::Unauthenticated(
                    "this node's Replicator needs the cluster's token: the caller sent none, \
                     or another (every node needs a token of the others' --cluster-token-file)"
                        .into(),
                )
                .into());
            }
        }
        self.check_cluster(&request)?;
        self.check_ring(&request)?;
        match crate::peer::sender_of(request.metadata()) {
            Some(sender) if sender == self.own_id.as_bytes() => {
                Err(Error::FailedPrecondition(format!(
                    "this call comes from node id '{}', which is this node's own: the node is \
                     listed as its own peer under another address, or two nodes share the id \
                     (give each node a unique --node-id, and list each other node once)",
                    self.own_id
                ))
                .into())
            }
            _ => Ok(request),
        }
    }
}

fn check_buckets(buckets: u32) -> Result<(), Error> {
    if buckets == 0 || buckets > MAX_BUCKETS {
        return Err(Error::InvalidArgument(format!(
            "buckets must be from 1 to {MAX_BUCKETS}, got {buckets}"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Replicator for ReplicatorService {
    async fn replicate(&self, request: Request<KeyValue>) -> Result<Response<Ack>, Status> {
        let kv = request.into_inner();
        self.check(&kv)?;
        let write = wire::checked_into_write(kv)?;
        Ok(Response::new(self.apply(vec![write]).await?))
    }

    async fn replicate_batch(&self, request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
        Ok(Response::new(self.apply_batch(request.into_inner()).await?))
    }

    type ReplicateStreamStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

    async fn replicate_stream(
        &self,
        request: Request<Streaming<WriteBatch>>,
    ) -> Result<Response<Self::ReplicateStreamStream>, Status> {
        // Once the node begins to shut down it takes no new batch: the stream ends (the peer
        // opens a new one when it next has a batch), and the graceful shutdown, which waits for
        // every open call, does not wait for a stream the peer would keep open for ever. A
        // batch being applied is still answered.
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let this = self.clone();
        // `then` applies one batch at a time, in order, so the acks come back in order. The
        // first error ends the stream (tonic sends it as the call's status).
        let acks = (request.into_inner().take_until(stopped)).then(move |batch| {
            let this = this.clone();
            async move {
                // A batch that does not decode or is over the limit ends the stream here, not
                // before the handler: said as the layer says it for other calls.
                let batch = batch.map_err(|status| {
                    let method = "/kvstore.v1.Replicator/ReplicateStream";
                    request_errors::explain(&status, method, this.limits.max_message_bytes())
                        .unwrap_or(status)
                })?;
                this.apply_batch(batch).await
            }
        });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestReply>, Status> {
        let DigestRequest {
            buckets,
            partitions,
        } = request.into_inner();
        check_buckets(buckets)?;
        let scope = wire::partitions_from_bytes(&partitions)?;
        let sums = self.node.node().await.digest(buckets, scope).await;
        Ok(Response::new(DigestReply {
            sums,
            clock: self.node.node().await.clock().physical(),
            node_id: self.node_id.clone(),
        }))
    }

    type PullStream = Pin<Box<dyn Stream<Item = Result<KeyValue, Status>> + Send>>;

    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let PullRequest {
            buckets,
            which,
            partitions,
        } = request.into_inner();
        check_buckets(buckets)?;
        let scope = wire::partitions_from_bytes(&partitions)?;
        if let Some(bad) = which.iter().find(|&&b| b >= buckets) {
            return Err(
                Error::InvalidArgument(format!("bucket {bad} out of range 0..{buckets}")).into(),
            );
        }
        // One scan of the map, handed over a shard's worth at a time as the peer reads it; a
        // peer that goes away stops the scan.
        let shards = ReceiverStream::new(self.node.node().await.entries_in(buckets, which, &scope));
        let entries = shards.flat_map(|shard| {
            futures::stream::iter(shard.into_iter().map(|write| Ok(KeyValue::from(write))))
        });
        Ok(Response::new(Box::pin(entries)))
    }

    type ScanStream = ListStream;

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ListStream>, Status> {
        let scope = wire::partitions_from_bytes(&request.into_inner().partitions)?;
        let listing = self.node.node().await.listing_of(scope).await;
        Ok(Response::new(
            self.lists.stream(listing.map_err(Error::from)?).await?,
        ))
    }

    async fn get_ring(
        &self,
        _: Request<GetRingRequest>,
    ) -> Result<Response<crate::pb::RingState>, Status> {
        Ok(Response::new(self.ring()?))
    }

    async fn push_ring(
        &self,
        request: Request<crate::pb::RingState>,
    ) -> Result<Response<crate::pb::RingState>, Status> {
        let state = RingState::from_bytes(&request.into_inner().state)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.node.node().await;
        self.members.adopt(state).await?;
        Ok(Response::new(self.ring()?))
    }

    async fn change_ring(
        &self,
        request: Request<RingChange>,
    ) -> Result<Response<crate::pb::RingState>, Status> {
        let sender = crate::peer::sender_of(request.metadata());
        let request = request.into_inner();
        let kind = crate::pb::ring_change::Kind::try_from(request.kind)
            .map_err(|_| Error::InvalidArgument(format!("unknown ring change {}", request.kind)))?;
        for node in std::iter::once(&request.node).chain(&request.also) {
            crate::net::parse_addr(node).map_err(|e| {
                Error::InvalidArgument(format!("a ring member is named by its address: {e}"))
            })?;
        }
        let change: crate::membership::Change = kind.into();
        if change != crate::membership::Change::Remove && !request.also.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "only a remove takes more than one node, not a {}",
                change.name()
            ))
            .into());
        }
        self.node.node().await;
        // A joining node calls the claimant itself, under its own id: one that a member
        // already has would be refused by that member on every call, and the join would
        // never finish.
        if change == crate::membership::Change::Join
            && let Some(id) = sender.and_then(|id| String::from_utf8(id).ok())
            && let Some(member) = self.members.member_with_id(&id, &request.node).await
        {
            return Err(Error::FailedPrecondition(format!(
                "node id '{id}' is already that of member {member}: give the joining node its \
                 own --node-id"
            ))
            .into());
        }
        let state = self
            .members
            .change(change, &request.node, &request.also)
            .await?;
        Ok(Response::new(crate::pb::RingState {
            state: state.to_bytes(),
        }))
    }

    async fn read(&self, request: Request<Key>) -> Result<Response<KeyValue>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        let entry = self
            .node
            .node()
            .await
            .get_entry(key.clone())
            .await
            .map_err(Error::from)?;
        Ok(Response::new(wire::entry_to_kv(key, entry)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(token) = token {
            let value = tonic::metadata::BinaryMetadataValue::from_bytes(token.as_bytes());
            request
                .metadata_mut()
                .insert_bin(crate::peer::TOKEN_HEADER, value);
        }
        request
    }

    #[test]
    fn any_of_the_cluster_tokens_lets_a_call_in() {
        let tokens = ClusterToken::several(["new", "old"]).unwrap();
        let mut check = SenderCheck::new("node1".into(), Some(tokens), false);
        assert!(check.call(call(Some("new"))).is_ok());
        assert!(check.call(call(Some("old"))).is_ok());
        for refused in [None, Some("other"), Some("ne"), Some("newold")] {
            let status = check.call(call(refused)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
    }

    #[test]
    fn a_call_without_a_certificate_is_refused_when_the_cluster_has_a_ca() {
        // A request that came over no TLS connection carries no certificates.
        let mut check = SenderCheck::new("node1".into(), None, true);
        let status = check.call(call(None)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("--tls-ca"),
            "{}",
            status.message()
        );
        let mut open = SenderCheck::new("node1".into(), None, false);
        assert!(open.call(call(None)).is_ok());
    }

    #[test]
    fn a_caller_of_another_cluster_is_refused() {
        let from = |cluster: Option<&str>| {
            let mut request = call(None);
            if let Some(cluster) = cluster {
                let value = cluster.parse().unwrap();
                request
                    .metadata_mut()
                    .insert(crate::peer::CLUSTER_HEADER, value);
            }
            request
        };
        let mut check = SenderCheck::new("node1".into(), None, false).with_cluster("prod".into());
        assert!(check.call(from(Some("prod"))).is_ok());
        assert!(check.call(from(None)).is_ok(), "an older node says none");
        let status = check.call(from(Some("staging"))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status
                .message()
                .contains("cluster 'staging', this node to 'prod'"),
            "{}",
            status.message()
        );
        // Without a name of its own, a node checks none.
        let mut open = SenderCheck::new("node1".into(), None, false);
        assert!(open.call(from(Some("staging"))).is_ok());
    }

    #[test]
    fn a_caller_with_another_ring_is_refused() {
        let with_ring = |ring: Option<&str>| {
            let mut request = call(None);
            if let Some(ring) = ring {
                let value = ring.parse().unwrap();
                request
                    .metadata_mut()
                    .insert(crate::peer::RING_HEADER, value);
            }
            request
        };
        let tag = crate::peer::ring_tag(Some("3x6-ab".into()));
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut ring = SenderCheck::new("n1".into(), None, false).with_ring(tag.clone(), started);
        assert!(ring.call(with_ring(Some("3x6-ab"))).is_ok());
        assert!(
            ring.call(with_ring(None)).is_ok(),
            "an older node, or a seed client"
        );
        let status = ring.call(with_ring(Some("2x6-cd"))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("2x6-cd") && status.message().contains("3x6-ab"));
        // Nodes at different points of a ring change hold different rings for a while, but
        // the same ring at the same point.
        assert!(ring.call(with_ring(Some("3x7-ef.v2p"))).is_ok());
        crate::peer::set_ring_tag(&tag, Some("3x7-ef.v2p".into()));
        assert!(ring.call(with_ring(Some("3x6-ab"))).is_ok());
        assert!(ring.call(with_ring(Some("3x7-ef.v2c"))).is_ok());
        let status = ring.call(with_ring(Some("3x7-00.v2p"))).unwrap_err();
        assert!(status.message().contains("3x7-ef.v2p"), "{status}");
        // Every ring keeps the same copies, and a node two versions behind missed a change.
        assert!(ring.call(with_ring(Some("2x7-ef.v2c"))).is_err());
        assert!(ring.call(with_ring(Some("3x8-ab.v4p"))).is_err());
        assert!(ring.call(with_ring(Some("3x7-ab.v3p"))).is_ok());
        // A node holding every key refuses a caller that thinks otherwise.
        let mut everywhere = SenderCheck::new("n1".into(), None, false);
        assert!(everywhere.call(with_ring(None)).is_ok());
        let status = everywhere.call(with_ring(Some("3x6-ab"))).unwrap_err();
        assert!(
            status.message().contains("every node holds every key"),
            "{status}"
        );
    }
}

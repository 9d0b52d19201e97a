//! `kvstore.v1.KVStore`: the client-facing service (Put, Get, List, Delete, Status, Backup).

use kvstore_actors::{Entry, WriteOutcome};
use tonic::{Request, Response, Status};

use crate::config::{ClusterToken, Limits};
use crate::error::Error;
use crate::membership::Change;
use crate::pb::kv_store_server::KvStore;
use crate::pb::{
    Ack, Consistency, Key, KeyValue, LeaveRequest, NodeStatus, PeerStatus, RemoveRequest, Value,
};
use crate::service::Starting;
use crate::service::list::{CHUNK, CHUNK_BYTES, ListBounds, ListStream};

/// The KVStore service: a handle to the node's actors, the input limits, the bounds on Lists,
/// and what Status reports about the node's identity.
pub struct KvService {
    node: Starting,
    limits: Limits,
    lists: ListBounds,
    node_id: String,
    data_dir: String,
    /// The node's part in ring changes.
    members: std::sync::Arc<crate::membership::Members>,
    /// The cluster's token, if it has one: a ring change (Leave, Remove) must carry it.
    token: Option<ClusterToken>,
    /// Whether a ring change must come with a certificate from the cluster's CA.
    needs_certificate: bool,
}

impl KvService {
    pub fn new(
        node: Starting,
        limits: Limits,
        lists: ListBounds,
        node_id: String,
        data_dir: String,
        members: std::sync::Arc<crate::membership::Members>,
    ) -> Self {
        Self {
            node,
            limits,
            lists,
            node_id,
            data_dir,
            members,
            token: None,
            needs_certificate: false,
        }
    }

    /// Asks for one of `token`'s tokens on every call that changes the ring.
    pub fn with_token(mut self, token: Option<ClusterToken>) -> Self {
        self.token = token;
        self
    }

    /// Asks, on every call that changes the ring, for a certificate from the cluster's CA
    /// (the TLS handshake has checked any certificate sent against it).
    pub fn with_certificates(mut self, needed: bool) -> Self {
        self.needs_certificate = needed;
        self
    }

    /// Refuses a ring change that does not carry what a node's call to another's Replicator
    /// must: the cluster's token, when it has one, and a certificate from its CA, when it has
    /// one. Taking a node out of the ring is for whoever runs the cluster, not for any client
    /// that may read and write.
    fn check_admin<T>(&self, request: &Request<T>, what: &str) -> Result<(), Error> {
        if self.needs_certificate && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Error::Unauthenticated(format!(
                "{what} changes the ring, and needs a certificate from the cluster's CA: the \
                 caller presented none (kvstore-cli --tls-cert and --tls-key)"
            )));
        }
        match &self.token {
            Some(token) if !token.admits(request.metadata()) => {
                Err(Error::Unauthenticated(format!(
                    "{what} changes the ring, and needs the cluster's token: the caller sent \
                     none, or another (kvstore-cli --cluster-token-file)"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The Ack for a replicated write: `ok` is the write quorum, the message names failed peers.
fn ack(outcome: &WriteOutcome, verb: &str) -> Ack {
    Ack {
        ok: outcome.ok(),
        message: outcome.message(verb),
        failed_peers: outcome.failures.iter().map(|(p, _)| p.clone()).collect(),
        version: Some(outcome.version.into()),
        ..Ack::default()
    }
}

#[tonic::async_trait]
impl KvStore for KvService {
    async fn put(&self, request: Request<KeyValue>) -> Result<Response<Ack>, Status> {
        let kv = request.into_inner();
        self.limits.check_key(&kv.key)?;
        self.limits.check_value(&kv.value)?;
        // Fields that only a replicated write carries: a client setting them wants something a
        // Put does not do, and should hear so rather than have them ignored.
        if kv.deleted {
            return Err(
                Error::InvalidArgument("Put does not take `deleted`; use Delete".into()).into(),
            );
        }
        if kv.version.is_some() {
            return Err(Error::InvalidArgument(
                "Put does not take a version; the node gives each write its own".into(),
            )
            .into());
        }
        let outcome = self
            .node
            .current()
            .await?
            .put(kv.key, kv.value)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ack(&outcome, "Stored")))
    }

    async fn get(&self, request: Request<Key>) -> Result<Response<Value>, Status> {
        let Key { key, consistency } = request.into_inner();
        self.limits.check_key(&key)?;
        let entry = match Consistency::try_from(consistency) {
            Ok(Consistency::Local) => self
                .node
                .serving()
                .await?
                .read(key.clone())
                .await
                .map_err(Error::from)?,
            Ok(Consistency::Quorum) => self
                .node
                .serving()
                .await?
                .get_quorum(key.clone())
                .await
                .map_err(Error::from)?,
            Err(_) => {
                return Err(
                    Error::InvalidArgument(format!("unknown consistency {consistency}")).into(),
                );
            }
        };
        match entry {
            Some(Entry {
                value: Some(value),
                version,
            }) => Ok(Response::new(Value {
                value: value.into(),
                version: Some(version.into()),
            })),
            _ => Err(Error::NotFound(key).into()),
        }
    }

    type ListStream = ListStream;

    async fn list(&self, _: Request<()>) -> Result<Response<Self::ListStream>, Status> {
        let node = self.node.serving().await?;
        if node.placement().is_some_and(|p| !p.is_everywhere()) {
            let listing = node.list_ring(CHUNK, CHUNK_BYTES).await;
            return Ok(Response::new(
                self.lists
                    .stream_ring(listing.map_err(Error::from)?)
                    .await?,
            ));
        }
        let listing = node.listing().await;
        Ok(Response::new(
            self.lists.stream(listing.map_err(Error::from)?).await?,
        ))
    }

    type BackupStream = ListStream;

    async fn backup(&self, _: Request<()>) -> Result<Response<Self::BackupStream>, Status> {
        // Every entry as of one instant, read as the client takes them (see `list`).
        let listing = self.node.serving().await?.listing().await;
        Ok(Response::new(
            self.lists.backup(listing.map_err(Error::from)?).await?,
        ))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<Ack>, Status> {
        self.check_admin(&request, "leave")?;
        let force = request.get_ref().force;
        self.node.serving().await?;
        let me = self.members.me().to_owned();
        let state = self.members.leave(force).await?;
        Ok(Response::new(Ack {
            ok: true,
            message: crate::membership::leave_answer(&state, &me),
            ..Ack::default()
        }))
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<Ack>, Status> {
        self.check_admin(&request, "remove")?;
        let request = request.into_inner();
        self.node.serving().await?;
        let node = self.members.resolve(&request.node).await?;
        let mut also = Vec::with_capacity(request.also.len());
        for name in &request.also {
            also.push(self.members.resolve(name).await?);
        }
        let state = self.members.request(Change::Remove, &node, &also).await?;
        let liveness = self.members.liveness().await;
        let dead = |m: &str| liveness.get(m) == Some(&crate::gossip::Liveness::Dead);
        Ok(Response::new(Ack {
            ok: true,
            message: crate::membership::remove_answer(&state, &node, &also, dead),
            ..Ack::default()
        }))
    }

    async fn status(&self, _: Request<()>) -> Result<Response<NodeStatus>, Status> {
        let node = self.node.serving().await?;
        let status = node.status().await.map_err(Error::from)?;
        let (replicas, partitions) = node.share();
        let placement = node.placement();
        let liveness = self.members.liveness().await;
        let (ring_version, ring_state, ring_phase) =
            placement.as_ref().map_or((1, "normal", "settled"), |p| {
                let state = p.state();
                (state.ring().version(), p.role(), state.phase().name())
            });
        let ring_change = (placement.as_ref()).map_or(String::new(), |p| {
            (self.members).change_line(p.state(), &liveness, &status.peers)
        });
        Ok(Response::new(NodeStatus {
            ring_version,
            ring_change,
            ring_state: ring_state.into(),
            ring_phase: ring_phase.into(),
            replicas: replicas as u32,
            partitions: partitions as u32,
            node_id: self.node_id.clone(),
            keys: status.store.keys as u64,
            tombstones: status.store.tombstones as u64,
            log_bytes: status.store.log_bytes,
            data_dir: self.data_dir.clone(),
            max_clock_offset_ms: status.max_clock_offset.as_millis() as u64,
            refusing_writes: status.refusing_writes.unwrap_or_default(),
            peers: status
                .peers
                .into_iter()
                .map(|p| PeerStatus {
                    state: p.state.to_string(),
                    backlog: p.backlog,
                    resync_pending: p.needs_resync,
                    resync_in_progress: p.resyncing,
                    last_contact_ms: p.last_contact.map(|d| d.as_millis() as u64),
                    replicated_writes: p.confirmed_writes,
                    replicated_batches: p.confirmed_batches,
                    clock_offset_ms: p.clock_offset.map(|nanos| nanos / 1_000_000),
                    gossip: (liveness.get(&p.addr)).map_or("", |l| l.name()).into(),
                    refuses: p.refusal.unwrap_or_default(),
                    address: p.addr,
                })
                .collect(),
        }))
    }

    async fn delete(&self, request: Request<Key>) -> Result<Response<Ack>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        let outcome = self
            .node
            .current()
            .await?
            .delete(key)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ack(&outcome, "Deleted")))
    }
}

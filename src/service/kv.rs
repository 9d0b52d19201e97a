//! `kvstore.v1.KVStore`: the client-facing service (Put, Get, List, Delete, Status, Backup).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use kvstore_actors::{Entry, WriteOutcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::Limits;
use crate::error::Error;
use crate::pb::kv_store_server::KvStore;
use crate::pb::{Ack, Consistency, Key, KeyValue, NodeStatus, PeerStatus, Value};
use crate::service::Starting;

/// Pairs buffered between a List's snapshot and its client. The producer waits when the buffer
/// is full, so a slow reader holds only its own snapshot, never the store.
const LIST_BUFFER: usize = 256;

/// The KVStore service: a handle to the node's actors, the input limits, and what Status
/// reports about the node's identity.
pub struct KvService {
    node: Starting,
    limits: Limits,
    node_id: String,
    data_dir: String,
}

impl KvService {
    pub fn new(node: Starting, limits: Limits, node_id: String, data_dir: String) -> Self {
        Self {
            node,
            limits,
            node_id,
            data_dir,
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
            .node()
            .await
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
                .node()
                .await
                .get_entry(key.clone())
                .await
                .map_err(Error::from)?,
            Ok(Consistency::Quorum) => self
                .node
                .node()
                .await
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

    type ListStream = ReceiverStream<Result<KeyValue, Status>>;

    async fn list(&self, _: Request<()>) -> Result<Response<Self::ListStream>, Status> {
        let pairs = self.node.node().await.list().await.map_err(Error::from)?;
        let (tx, rx) = mpsc::channel(LIST_BUFFER);
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            for (key, value) in pairs {
                let kv = KeyValue {
                    key,
                    value,
                    ..Default::default()
                };
                // A failed send means the client went away: stop, and drop the snapshot.
                if tx.send(Ok(kv)).await.is_err() {
                    tracing::debug!("list client went away; stream stopped");
                    break;
                }
            }
        }));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type BackupStream = Pin<Box<dyn Stream<Item = Result<KeyValue, Status>> + Send>>;

    async fn backup(&self, _: Request<()>) -> Result<Response<Self::BackupStream>, Status> {
        // One scan of the map, in turn with the node's other scans, handed over a shard's
        // worth at a time as the client reads it; a client that goes away stops it.
        let shards = ReceiverStream::new(self.node.node().await.entries_in(1, vec![0]));
        let entries = shards.flat_map(|shard| {
            futures::stream::iter(shard.into_iter().map(|write| Ok(KeyValue::from(write))))
        });
        Ok(Response::new(Box::pin(entries)))
    }

    async fn status(&self, _: Request<()>) -> Result<Response<NodeStatus>, Status> {
        let status = self.node.node().await.status().await.map_err(Error::from)?;
        Ok(Response::new(NodeStatus {
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
                    address: p.addr,
                    state: p.state.to_string(),
                    backlog: p.backlog,
                    resync_pending: p.needs_resync,
                    resync_in_progress: p.resyncing,
                    last_contact_ms: p.last_contact.map(|d| d.as_millis() as u64),
                    replicated_writes: p.confirmed_writes,
                    replicated_batches: p.confirmed_batches,
                    clock_offset_ms: p.clock_offset.map(|nanos| nanos / 1_000_000),
                })
                .collect(),
        }))
    }

    async fn delete(&self, request: Request<Key>) -> Result<Response<Ack>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        let outcome = self
            .node
            .node()
            .await
            .delete(key)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ack(&outcome, "Deleted")))
    }
}

//! `kvstore.v1.KVStore`: the client-facing service (Put, Get, List, Delete).

use std::sync::Arc;

use kvstore_actors::WriteOutcome;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::Node;
use crate::config::Limits;
use crate::error::Error;
use crate::pb::kv_store_server::KvStore;
use crate::pb::{Ack, Key, KeyValue, Value};

/// Pairs buffered between a List's snapshot and its client. The producer waits when the buffer
/// is full, so a slow reader holds only its own snapshot, never the store.
const LIST_BUFFER: usize = 256;

/// The KVStore service: a handle to the node's actors and the input limits.
pub struct KvService {
    node: Arc<Node>,
    limits: Limits,
}

impl KvService {
    pub fn new(node: Arc<Node>, limits: Limits) -> Self {
        Self { node, limits }
    }
}

/// The Ack for a replicated write: `ok` is the write quorum, the message names failed peers.
fn ack(outcome: &WriteOutcome, verb: &str) -> Ack {
    Ack {
        ok: outcome.ok(),
        message: outcome.message(verb),
        failed_peers: outcome.failures.iter().map(|(p, _)| p.clone()).collect(),
    }
}

#[tonic::async_trait]
impl KvStore for KvService {
    async fn put(&self, request: Request<KeyValue>) -> Result<Response<Ack>, Status> {
        let kv = request.into_inner();
        self.limits.check_key(&kv.key)?;
        self.limits.check_value(&kv.value)?;
        let outcome = self.node.put(kv.key, kv.value).await.map_err(Error::from)?;
        Ok(Response::new(ack(&outcome, "Stored")))
    }

    async fn get(&self, request: Request<Key>) -> Result<Response<Value>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        match self.node.get(key.clone()).await.map_err(Error::from)? {
            Some(value) => Ok(Response::new(Value { value })),
            None => Err(Error::NotFound(key).into()),
        }
    }

    type ListStream = ReceiverStream<Result<KeyValue, Status>>;

    async fn list(&self, _: Request<()>) -> Result<Response<Self::ListStream>, Status> {
        let pairs = self.node.snapshot().await.map_err(Error::from)?;
        let (tx, rx) = mpsc::channel(LIST_BUFFER);
        tokio::spawn(async move {
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
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delete(&self, request: Request<Key>) -> Result<Response<Ack>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        let outcome = self.node.delete(key).await.map_err(Error::from)?;
        Ok(Response::new(ack(&outcome, "Deleted")))
    }
}

//! `kvstore.v1.Replicator`: where peers deliver their writes, and the internal calls of
//! anti-entropy (digests, bucket pulls) and quorum reads.

use std::sync::Arc;

use kvstore_actors::Write;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::Node;
use crate::config::Limits;
use crate::error::Error;
use crate::pb::replicator_server::Replicator;
use crate::pb::{self, Ack, DigestReply, DigestRequest, Key, KeyValue, PullRequest, WriteBatch};

/// Most buckets a digest may ask for: 512 KiB of sums.
const MAX_BUCKETS: u32 = 65_536;
/// Entries buffered between a bucket pull and the peer reading it.
const PULL_BUFFER: usize = 256;

/// The Replicator service: a handle to the node's actors and the input limits.
pub struct ReplicatorService {
    node: Arc<Node>,
    limits: Limits,
}

impl ReplicatorService {
    pub fn new(node: Arc<Node>, limits: Limits) -> Self {
        Self { node, limits }
    }

    /// A replicated write, checked like a client's: a Replicate is a public RPC like any other.
    /// The limits are checked first: a write refused for its size must not use up one of the
    /// node ids the node will ever accept (see `MAX_NODE_IDS`).
    fn check(&self, kv: KeyValue) -> Result<Write, Error> {
        self.limits.check_key(&kv.key)?;
        self.limits.check_value(&kv.value)?;
        Write::try_from(kv)
    }

    async fn apply(&self, writes: Vec<Write>) -> Result<Response<Ack>, Status> {
        let n = writes.len();
        let changed = self.node.apply(writes).await.map_err(Error::from)?;
        Ok(Response::new(Ack {
            ok: true,
            message: format!("applied {changed} of {n}"),
            ..Ack::default()
        }))
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
        let write = self.check(request.into_inner())?;
        self.apply(vec![write]).await
    }

    async fn replicate_batch(&self, request: Request<WriteBatch>) -> Result<Response<Ack>, Status> {
        let writes = (request.into_inner().writes.into_iter())
            .map(|kv| self.check(kv))
            .collect::<Result<Vec<_>, _>>()?;
        self.apply(writes).await
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestReply>, Status> {
        let buckets = request.into_inner().buckets;
        check_buckets(buckets)?;
        let sums = self.node.digest(buckets).await;
        Ok(Response::new(DigestReply { sums }))
    }

    type PullStream = ReceiverStream<Result<KeyValue, Status>>;

    async fn pull(
        &self,
        request: Request<PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let PullRequest { buckets, which } = request.into_inner();
        check_buckets(buckets)?;
        if let Some(bad) = which.iter().find(|&&b| b >= buckets) {
            return Err(
                Error::InvalidArgument(format!("bucket {bad} out of range 0..{buckets}")).into(),
            );
        }
        let entries = self.node.entries_in(buckets, which).await;
        let (tx, rx) = mpsc::channel(PULL_BUFFER);
        tokio::spawn(async move {
            for write in entries {
                if tx.send(Ok(KeyValue::from(write))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, request: Request<Key>) -> Result<Response<KeyValue>, Status> {
        let key = request.into_inner().key;
        self.limits.check_key(&key)?;
        let entry = self
            .node
            .get_entry(key.clone())
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::entry_to_kv(key, entry)))
    }
}

//! `kvstore.v1.Replicator`: where peers deliver their writes.

use std::sync::Arc;

use kvstore_actors::Write;
use tonic::{Request, Response, Status};

use crate::Node;
use crate::config::Limits;
use crate::error::Error;
use crate::pb::replicator_server::Replicator;
use crate::pb::{Ack, KeyValue};

/// The Replicator service: a handle to the node's actors and the input limits.
pub struct ReplicatorService {
    node: Arc<Node>,
    limits: Limits,
}

impl ReplicatorService {
    pub fn new(node: Arc<Node>, limits: Limits) -> Self {
        Self { node, limits }
    }
}

#[tonic::async_trait]
impl Replicator for ReplicatorService {
    async fn replicate(&self, request: Request<KeyValue>) -> Result<Response<Ack>, Status> {
        let write = Write::try_from(request.into_inner())?;
        // Peers enforce the same limits, but a Replicate is a public RPC like any other.
        self.limits.check_key(&write.key)?;
        if let Some(value) = &write.entry.value {
            self.limits.check_value(value)?;
        }
        let changed = self.node.apply(vec![write]).await.map_err(Error::from)?;
        Ok(Response::new(Ack {
            ok: true,
            message: if changed > 0 {
                "applied"
            } else {
                "already newer"
            }
            .into(),
            failed_peers: Vec::new(),
        }))
    }
}

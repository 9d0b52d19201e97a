//! The gRPC client a replication actor uses to reach its peer's `Replicator` service.
//!
//! The channel is created lazily and reconnects by itself (tonic's `Channel`), so a node starts
//! while its peers are down and picks them up when they come back; each call fails fast with
//! the reason while a peer is unreachable.

use std::time::Duration;

use kvstore_actors::{PeerClient, PeerError, Write};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, status_reason};
use crate::pb::replicator_client::ReplicatorClient;

/// Connection to one peer.
#[derive(Clone, Debug)]
pub struct GrpcPeer {
    client: ReplicatorClient<Channel>,
}

impl GrpcPeer {
    /// A lazily connected client for the peer at `addr` (`host:port`). `call_timeout` bounds each
    /// Replicate call; `max_message_bytes` matches the node's own message limit.
    pub fn new(
        addr: &str,
        connect_timeout: Duration,
        call_timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Self, Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidAddress {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .connect_timeout(connect_timeout)
            .timeout(call_timeout)
            .tcp_nodelay(true);
        let client = ReplicatorClient::new(endpoint.connect_lazy())
            .max_encoding_message_size(max_message_bytes)
            .max_decoding_message_size(max_message_bytes);
        Ok(Self { client })
    }
}

impl PeerClient for GrpcPeer {
    async fn replicate(&self, write: Write) -> Result<(), PeerError> {
        // Clones of a tonic client share one connection; the clone is just a handle.
        let mut client = self.client.clone();
        match client.replicate(crate::pb::KeyValue::from(write)).await {
            Ok(ack) if ack.get_ref().ok => Ok(()),
            Ok(ack) => Err(PeerError::Rejected(ack.into_inner().message)),
            Err(status) => Err(match status.code() {
                Code::Unavailable | Code::Unknown => PeerError::Unreachable(status_reason(&status)),
                // tonic reports its own client-side timeout as Cancelled.
                Code::DeadlineExceeded | Code::Cancelled => PeerError::TimedOut,
                code => PeerError::Rejected(format!("{code:?}: {}", status.message())),
            }),
        }
    }
}

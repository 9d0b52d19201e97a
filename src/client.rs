//! A small client for one node's `KVStore` service, as the REPL and the tests use it.

use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::error::Error;
use crate::net::{lazy_channel, parse_addr};
use crate::pb::kv_store_client::KvStoreClient;
use crate::pb::{Ack, Consistency, Key, KeyValue, NodeStatus, Value};

/// Largest message the client accepts. Generous, because the node's limits are configurable and
/// the client should not be the one to refuse a value the node agreed to store.
const CLIENT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A connection to one node. Connects lazily and reconnects by itself, so it can be made while
/// the node is down; each call then fails with `UNAVAILABLE` until the node is back.
#[derive(Clone, Debug)]
pub struct Client {
    inner: KvStoreClient<Channel>,
    addr: String,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
    /// The cluster's token, sent on the calls that change the ring.
    token: Option<Vec<u8>>,
}

impl Client {
    /// A client for the node at `addr`: a port on 127.0.0.1 or `host:port`. `timeout` bounds each
    /// call. Must be called inside a tokio runtime.
    pub fn new(addr: &str, timeout: Duration) -> Result<Self, Error> {
        Self::with_tls(addr, timeout, None)
    }

    /// A client that talks TLS to the node when `tls` is given (see [`crate::tls::client_config`]).
    pub fn with_tls(
        addr: &str,
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, Error> {
        let addr = parse_addr(addr)?;
        let inner = KvStoreClient::new(lazy_channel(&addr, timeout, timeout, tls)?)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
        Ok(Self {
            inner,
            addr,
            timeout,
            tls: tls.cloned(),
            token: None,
        })
    }

    /// This client, sending `token` (the cluster's) on the calls that change the ring,
    /// which a node with a token refuses without it.
    pub fn with_token(mut self, token: Option<&crate::config::ClusterToken>) -> Self {
        self.token = token.map(|t| t.sent().to_vec());
        self
    }

    /// `message` as a request, carrying the cluster's token if the client has it.
    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let value = tonic::metadata::BinaryMetadataValue::from_bytes(token);
            (request.metadata_mut()).insert_bin(crate::peer::TOKEN_HEADER, value);
        }
        request
    }

    /// A client, set up as this one, for another node: one of this node's peers, say.
    pub fn to(&self, addr: &str) -> Result<Self, Error> {
        let mut other = Self::with_tls(addr, self.timeout, self.tls.as_ref())?;
        other.token = self.token.clone();
        Ok(other)
    }

    /// The node's address, as `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the client talks TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    pub async fn put(&self, key: &str, value: &str) -> Result<Ack, Status> {
        let kv = KeyValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        Ok(self.inner.clone().put(kv).await?.into_inner())
    }

    /// `key`'s value on this node.
    pub async fn get(&self, key: &str) -> Result<String, Status> {
        Ok(self.get_with(key, Consistency::Local).await?.value)
    }

    /// `key`'s value and version, read with `consistency`.
    pub async fn get_with(&self, key: &str, consistency: Consistency) -> Result<Value, Status> {
        let key = Key {
            key: key.into(),
            consistency: consistency.into(),
        };
        Ok(self.inner.clone().get(key).await?.into_inner())
    }

    pub async fn delete(&self, key: &str) -> Result<Ack, Status> {
        let key = Key {
            key: key.into(),
            ..Key::default()
        };
        Ok(self.inner.clone().delete(key).await?.into_inner())
    }

    /// Asks the node to leave the ring; refused if fewer nodes would stay than the ring keeps
    /// copies of each key.
    pub async fn leave(&self) -> Result<Ack, Status> {
        self.leave_with(false).await
    }

    /// Asks the node to leave the ring; with `force`, even if fewer nodes would stay than the
    /// ring keeps copies of each key.
    pub async fn leave_with(&self, force: bool) -> Result<Ack, Status> {
        let request = self.admin(crate::pb::LeaveRequest { force });
        Ok(self.inner.clone().leave(request).await?.into_inner())
    }

    /// Asks the node to take `node`, down for good, out of the ring.
    pub async fn remove(&self, node: &str) -> Result<Ack, Status> {
        self.remove_all(node, &[]).await
    }

    /// Asks the node to take `node` and `also`, all down for good, out of the ring in one
    /// change.
    pub async fn remove_all(&self, node: &str, also: &[&str]) -> Result<Ack, Status> {
        let request = self.admin(crate::pb::RemoveRequest {
            node: node.to_owned(),
            also: also.iter().map(|n| n.to_string()).collect(),
        });
        Ok(self.inner.clone().remove(request).await?.into_inner())
    }

    /// The node's status: keys, log size, peers.
    pub async fn status(&self) -> Result<NodeStatus, Status> {
        Ok(self.inner.clone().status(()).await?.into_inner())
    }

    /// Every entry the node holds, tombstones included, with its version: the node's side of
    /// a backup (see [`crate::backup::write`]).
    pub async fn backup_stream(&self) -> Result<tonic::Streaming<KeyValue>, Status> {
        Ok(self.inner.clone().backup(()).await?.into_inner())
    }

    /// Every pair the node holds, in key order.
    pub async fn list(&self) -> Result<Vec<(String, String)>, Status> {
        let mut stream = self.inner.clone().list(()).await?.into_inner();
        let mut pairs = Vec::new();
        while let Some(kv) = stream.next().await {
            let kv = kv?;
            pairs.push((kv.key, kv.value));
        }
        Ok(pairs)
    }
}

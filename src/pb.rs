//! The generated wire types and services of `kvstore.v1` (see `proto/kvstore.proto`), and the
//! conversions from the actors' types that cannot fail. Conversions the other way, which check
//! what arrives, are in [`crate::wire`].

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use kvstore_actors::{Version as ActorVersion, Write};

tonic::include_proto!("kvstore.v1");

/// The encoded descriptors of `proto/kvstore.proto` and what it imports, for the reflection
/// service: from the same protox build as the code above.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kvstore_descriptor.bin"));

impl From<ActorVersion> for Version {
    fn from(v: ActorVersion) -> Self {
        Version {
            hlc: v.time,
            node_id: v.node.to_string(),
        }
    }
}

/// For sending a write the sender keeps (it may have to send it again).
impl From<&Write> for KeyValue {
    fn from(write: &Write) -> Self {
        KeyValue {
            key: write.key.clone(),
            value: write.entry.value.as_deref().unwrap_or_default().to_string(),
            version: Some(Version {
                hlc: write.entry.version.time,
                node_id: write.entry.version.node.to_string(),
            }),
            deleted: write.entry.value.is_none(),
        }
    }
}

impl From<Write> for KeyValue {
    fn from(write: Write) -> Self {
        let deleted = write.entry.value.is_none();
        KeyValue {
            key: write.key,
            value: write.entry.value.map(String::from).unwrap_or_default(),
            version: Some(Version {
                hlc: write.entry.version.time,
                node_id: write.entry.version.node.to_string(),
            }),
            deleted,
        }
    }
}

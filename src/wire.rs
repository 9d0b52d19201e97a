//! Wire messages into the actors' types, checked: what a peer or a stranger sends is a public
//! input like any client's, and is refused with a message naming the problem.

use kvstore_actors::placement::PartitionSet;
use kvstore_actors::{Entry, NodeId, Version as ActorVersion, Write};

use crate::error::Error;
use crate::pb::KeyValue;

/// A stored entry as a `Read` answer: no version means absent.
pub fn entry_to_kv(key: String, entry: Option<Entry>) -> KeyValue {
    match entry {
        Some(entry) => KeyValue::from(Write { key, entry }),
        None => KeyValue {
            key,
            ..Default::default()
        },
    }
}

/// A `Read` answer as an entry.
pub fn kv_to_entry(kv: KeyValue) -> Result<Option<Entry>, Error> {
    if kv.version.is_none() {
        return Ok(None);
    }
    checked(kv).map(|w| Some(w.entry))
}

/// A replicated write, checked ([`check_replicated`]) and converted.
pub fn checked(kv: KeyValue) -> Result<Write, Error> {
    check_replicated(&kv)?;
    checked_into_write(kv)
}

/// Checks a replicated write without converting it. Conversion interns the node id, which
/// uses up one of the ids a node will ever accept: a batch is checked whole first, so that a
/// refused batch uses up none.
///
/// A replicated write must carry its version: applying a versionless one would be the original Go system's
/// blind overwrite, the very thing that made replicas diverge.
pub fn check_replicated(kv: &KeyValue) -> Result<(), Error> {
    let version = kv.version.as_ref().ok_or_else(|| {
        Error::InvalidArgument("Replicate requires a version (field 3); none was sent".into())
    })?;
    if version.node_id.is_empty()
        || version.node_id.len() > kvstore_actors::version::MAX_NODE_ID_BYTES
    {
        return Err(Error::InvalidArgument(format!(
            "version.node_id must be 1 to {} bytes, got {}",
            kvstore_actors::version::MAX_NODE_ID_BYTES,
            version.node_id.len()
        )));
    }
    if kv.deleted && !kv.value.is_empty() {
        return Err(Error::InvalidArgument(
            "a deleted entry must not carry a value".into(),
        ));
    }
    Ok(())
}

/// Converts a write that passed [`check_replicated`].
pub fn checked_into_write(kv: KeyValue) -> Result<Write, Error> {
    let version = kv
        .version
        .expect("checked: a replicated write has a version");
    Ok(Write {
        key: kv.key,
        entry: Entry {
            value: (!kv.deleted).then(|| kv.value.into_boxed_str()),
            version: ActorVersion {
                time: version.hlc,
                node: NodeId::new(&version.node_id)
                    .map_err(|e| Error::ResourceExhausted(e.to_string()))?,
            },
        },
    })
}

/// A partition set as a Digest or Pull carries it: empty for every partition, which is what
/// a node that predates partitions sends and understands.
pub fn partitions_to_bytes(set: &PartitionSet) -> Vec<u8> {
    if set.is_all() {
        Vec::new()
    } else {
        set.to_bytes()
    }
}

/// The partition set of a Digest or Pull (see [`partitions_to_bytes`]).
pub fn partitions_from_bytes(bytes: &[u8]) -> Result<PartitionSet, Error> {
    if bytes.is_empty() {
        return Ok(PartitionSet::all());
    }
    PartitionSet::from_bytes(bytes).map_err(|e| match e {
        kvstore_actors::Error::Ring(why) => Error::InvalidArgument(format!("partitions: {why}")),
        other => Error::Actors(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_round_trip() {
        for value in [Some("v".to_string()), None] {
            let write = Write {
                key: "k".into(),
                entry: Entry {
                    value: value.map(String::into_boxed_str),
                    version: ActorVersion {
                        time: 42,
                        node: NodeId::new("n1").unwrap(),
                    },
                },
            };
            let back = checked(KeyValue::from(write.clone())).unwrap();
            assert_eq!(back, write);
        }
    }

    #[test]
    fn versionless_replicate_is_refused() {
        let kv = KeyValue {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        };
        let err = checked(kv).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(m) if m.contains("version")));
    }

    #[test]
    fn a_partition_set_travels_as_a_bitmap_or_not_at_all() {
        assert!(partitions_to_bytes(&PartitionSet::all()).is_empty());
        assert!(partitions_from_bytes(&[]).unwrap().is_all());
        let set: PartitionSet = [3, 700].into_iter().collect();
        assert_eq!(
            partitions_from_bytes(&partitions_to_bytes(&set)).unwrap(),
            set
        );
        let err = partitions_from_bytes(&[0xff; 12]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("128 bytes"), "{err}");
    }
}

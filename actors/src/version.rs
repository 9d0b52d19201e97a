//! Versions of writes, and the node ids inside them.

use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use lasso::{Spur, ThreadedRodeo};

/// Most new node ids a process takes from the network (through [`NodeId::new`]) in its lifetime.
/// A cluster has a handful; the bound is there because interned ids are never freed, and a
/// Replicate may carry any id. Ids this node has reason to trust ([`NodeId::known`]: its own,
/// its peers', those read back from its own disk) do not count and are never refused: a
/// stranger who fills the allowance cannot lock the cluster's own nodes out, whatever was
/// stored must load, and a restart gives the network a fresh allowance.
pub const MAX_NODE_IDS: usize = 1 << 16;

/// New ids interned through [`NodeId::new`] so far.
static NEW_IDS: AtomicUsize = AtomicUsize::new(0);

/// The process-wide table of node ids. Every stored entry names the node that wrote it, and a
/// million copies of a handful of ids is memory for nothing: an entry holds a 4-byte handle
/// into this table instead (which is what brings a node under 250 bytes per key).
fn node_ids() -> &'static ThreadedRodeo<Spur> {
    static IDS: OnceLock<ThreadedRodeo<Spur>> = OnceLock::new();
    IDS.get_or_init(ThreadedRodeo::new)
}

/// A node's identity in versions: an interned string, so it is `Copy`, four bytes, and equal
/// exactly when the strings are. It orders by the string, since that order is the tie-break
/// every node must agree on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(Spur);

/// [`MAX_NODE_IDS`] new node ids have already been taken since the process started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many distinct node ids (this node keeps at most {MAX_NODE_IDS})")]
pub struct TooManyNodeIds;

impl NodeId {
    /// The id for `id` as it arrives from elsewhere, interning it if it is new and the table
    /// has room.
    pub fn new(id: &str) -> Result<Self, TooManyNodeIds> {
        let ids = node_ids();
        if let Some(known) = ids.get(id) {
            return Ok(Self(known));
        }
        // Racing callers may overshoot the bound by a few ids; it is a bound, not a quota.
        if NEW_IDS.fetch_add(1, Ordering::Relaxed) >= MAX_NODE_IDS {
            NEW_IDS.fetch_sub(1, Ordering::Relaxed);
            return Err(TooManyNodeIds);
        }
        ids.try_get_or_intern(id)
            .map(Self)
            .map_err(|_| TooManyNodeIds)
    }

    /// Whether every id in `ids` that is not known yet fits the bound now: a batch of writes
    /// checks this first, so that one refused for the bound takes none of its new ids. Racing
    /// callers may still overshoot by a few (see [`NodeId::new`]).
    pub fn room_for<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<(), TooManyNodeIds> {
        let known = node_ids();
        let mut new: Vec<&str> = ids
            .into_iter()
            .filter(|id| known.get(id).is_none())
            .collect();
        new.sort_unstable();
        new.dedup();
        if NEW_IDS.load(Ordering::Relaxed) + new.len() > MAX_NODE_IDS {
            return Err(TooManyNodeIds);
        }
        Ok(())
    }

    /// The id for `id`, from a source this node trusts: its own id, a peer's own id as the peer
    /// gives it in its answers, or an id read back from this node's own log or snapshot.
    /// Always interned, past [`MAX_NODE_IDS`] too: those sources are few, and bounded by what
    /// the node was configured with or once stored.
    pub fn known(id: &str) -> Self {
        Self(node_ids().get_or_intern(id))
    }

    /// The id as text.
    pub fn as_str(self) -> &'static str {
        node_ids().resolve(&self.0)
    }

    /// The handle as stored inside an entry (meaningful only within this process).
    pub(crate) fn to_bits(self) -> u32 {
        lasso::Key::into_usize(self.0) as u32
    }

    /// The id from [`Self::to_bits`] of an id interned in this process.
    pub(crate) fn from_bits(bits: u32) -> Self {
        Self(lasso::Key::try_from_usize(bits as usize).expect("bits of an interned node id"))
    }
}

impl std::ops::Deref for NodeId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        if self == other {
            CmpOrdering::Equal
        } else {
            self.as_str().cmp(other.as_str())
        }
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The version of one write: hybrid logical clock time, then the writing node's id as the
/// tie-break. The derived ordering compares `time` first, so versions are totally ordered, and
/// two distinct writes never share a version as long as node ids are unique in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// HLC reading as a 64-bit NTP timestamp (32 bits of seconds, 32 of fraction).
    pub time: u64,
    /// Id of the node that accepted the write.
    pub node: NodeId,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.time, self.node)
    }
}

/// Longest node id, in bytes (it is stored with every entry).
pub const MAX_NODE_ID_BYTES: usize = 255;

#[cfg(test)]
mod tests {
    use super::*;

    fn v(time: u64, node: &str) -> Version {
        Version {
            time,
            node: id(node),
        }
    }

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    #[test]
    fn node_ids_are_interned_and_order_by_their_text() {
        let (a, b) = (id("node-b"), id("node-a"));
        assert_eq!(a, id("node-b"));
        assert_ne!(a, b);
        // Interned first, but "node-a" < "node-b": the order is the text's, as on every node.
        assert!(b < a);
        assert_eq!(&*a, "node-b");
        assert_eq!(NodeId::from_bits(a.to_bits()), a);
    }

    #[test]
    fn versions_order_by_time_then_node() {
        assert!(v(1, "b") < v(2, "a"));
        assert!(v(2, "a") < v(2, "b"));
        assert_eq!(v(3, "a"), v(3, "a"));
    }
}

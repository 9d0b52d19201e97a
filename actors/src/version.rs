//! Versions of writes, the node ids inside them, and the hybrid logical clock that issues them.

use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lasso::{Spur, ThreadedRodeo};

/// Most new node ids a process takes from the network (through [`NodeId::new`]) in its lifetime.
/// A cluster has a handful; the bound is there because interned ids are never freed, and a
/// Replicate may carry any id. Ids read back from this node's own disk do not count and are
/// never refused: whatever was stored must load, and a restart gives the network a fresh
/// allowance rather than starting full.
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

    /// The id for `id` as read from this node's own log or snapshot: always interned, past
    /// [`MAX_NODE_IDS`] too, so a node that once stored an entry can always load it again.
    pub fn from_disk(id: &str) -> Self {
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

/// A node's hybrid logical clock. `uhlc` does the clock arithmetic (physical time, logical
/// counter in the low bits, monotonic under concurrent callers); this wrapper attaches the node
/// id and speaks [`Version`].
pub struct Clock {
    hlc: uhlc::HLC,
    node: NodeId,
    /// The last version time issued, and after a restart the newest time found on disk: every
    /// new version is above it, so the clock never goes backwards, even if the machine's clock
    /// did while the node was down.
    last: AtomicU64,
}

impl Clock {
    /// A clock for `node` reading the system time.
    pub fn new(node: NodeId) -> Self {
        Self {
            hlc: uhlc::HLC::default(),
            node,
            last: AtomicU64::new(0),
        }
    }

    /// A clock driven by `physical` instead of the system time, for tests.
    pub fn with_physical_clock(node: NodeId, physical: fn() -> uhlc::NTP64) -> Self {
        Self {
            hlc: uhlc::HLCBuilder::new().with_clock(physical).build(),
            node,
            last: AtomicU64::new(0),
        }
    }

    /// At a node's start: makes every later version newer than any this node issued before it
    /// stopped (`own`, the newest of them on disk, and the ones lost in a crash), and than the
    /// versions of other nodes on disk (newest `any`) as far as the drift bound reaches.
    ///
    /// A version this node issued may not be on disk if the node crashed before its fsync, and
    /// its peers may hold it: a write goes to them while the local log syncs. This clock only
    /// ever ran ahead of the physical clock by what it observed, and uhlc observes nothing more
    /// than its drift bound ahead (500 ms), so starting from physical time plus that bound
    /// orders every new version after it. The newest time on disk, plus [`LOST_BUMPS_MARGIN`]
    /// for writes lost after it, covers a physical clock that has gone back since.
    ///
    /// Other nodes' times beyond the drift bound are versions too far ahead to observe, and do
    /// not move the clock: one peer write from a clock 20 hours fast would otherwise put every
    /// later write of this node 20 hours ahead, beating writes made after it through other
    /// nodes. Their keys are covered key by key: a local write of such a key is bumped above
    /// its version (see `StoreActor::write_local`), and the first bump of a key after a start
    /// takes the margin, so it orders after bumps of it lost in the crash. (A bump of ours
    /// that is on disk does move the clock, being our own version: to tell it from a reading of
    /// a clock that has gone back since, nothing is recorded.)
    ///
    /// Not covered: the peer's far-ahead version and our bump above it both lost in the crash
    /// (the peer's still unsynced here, ours sent on). Then nothing on disk says how far ahead
    /// that key was; our next write of it orders below the lost bump, which wins once a peer
    /// sends it back. Versions still differ, so replicas converge, on the older write: the
    /// price of a peer clock more than the drift bound ahead, and a crash inside a sync.
    pub fn restore(&self, own: u64, any: u64) {
        let now = self.hlc.new_timestamp().get_time().as_u64();
        let reach = now.saturating_add(self.hlc.get_delta().as_u64());
        let newest = own.max(any.min(reach));
        self.last.fetch_max(
            newest.saturating_add(LOST_BUMPS_MARGIN).max(reach),
            Ordering::AcqRel,
        );
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// A fresh version, greater than every version this clock issued or observed before.
    pub fn now(&self) -> Version {
        let hlc = self.hlc.new_timestamp().get_time().as_u64();
        let mut last = self.last.load(Ordering::Acquire);
        let time = loop {
            let next = hlc.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break next,
                Err(seen) => last = seen,
            }
        };
        Version {
            time,
            node: self.node,
        }
    }

    /// Moves the clock past `seen`, so later local writes order after it. Returns false when
    /// `seen` is too far in the future to trust (uhlc's drift bound); the caller still applies
    /// the entry, and the store orders its next local write of that key after it anyway.
    pub fn observe(&self, seen: &Version) -> bool {
        // The id inside the uhlc timestamp only breaks ties inside uhlc; ours is `Version::node`.
        let ts = uhlc::Timestamp::new(uhlc::NTP64(seen.time), *self.hlc.get_id());
        self.hlc.update_with_timestamp(&ts).is_ok()
    }
}

/// How far above the newest version on disk a restarted node's clock starts: more writes of
/// one key than a crash can lose (2^24, about 16.8 million: at 100k writes a second to one key,
/// a log that did not sync for 2.8 minutes), yet only 3.9 ms of clock time, so versions after a
/// restart stay close to physical time. See [`Clock::restore`].
pub const LOST_BUMPS_MARGIN: u64 = 1 << 24;

/// Longest node id, in bytes (it is stored with every entry).
pub const MAX_NODE_ID_BYTES: usize = 255;
/// How far ahead of this node's clock a peer's version may be: generous for clock skew, far
/// short of what would pin a key (or the clock) for good.
pub const MAX_FUTURE: Duration = Duration::from_secs(24 * 3600);

/// The newest version time accepted from elsewhere, as of now.
pub fn latest_acceptable() -> u64 {
    uhlc::system_time_clock()
        .as_u64()
        .saturating_add(ntp_duration(MAX_FUTURE))
}

/// Converts a duration to the 64-bit NTP format of version times (32.32 fixed point).
pub fn ntp_duration(d: Duration) -> u64 {
    (d.as_secs() << 32) + ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// The version time `d` ago by the system clock (for tombstone grace periods).
pub fn now_minus(d: Duration) -> u64 {
    uhlc::system_time_clock()
        .as_u64()
        .saturating_sub(ntp_duration(d))
}

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

    #[test]
    fn clock_is_strictly_increasing() {
        let clock = Clock::new(id("n1"));
        let mut last = clock.now();
        for _ in 0..10_000 {
            let next = clock.now();
            assert!(next > last, "{next} not after {last}");
            last = next;
        }
    }

    #[test]
    fn clock_never_goes_below_a_restored_time() {
        // As if the machine's clock went back to zero while the node was down.
        let clock = Clock::with_physical_clock(id("n1"), uhlc::zero_clock);
        let on_disk = 1u64 << 40;
        clock.restore(on_disk, on_disk);
        let a = clock.now();
        assert!(a.time > on_disk);
        assert!(clock.now() > a);
    }

    #[test]
    fn a_peers_version_beyond_the_drift_bound_does_not_move_the_clock() {
        // On disk: our own versions up to the crash, and one peer write from a clock 20 hours
        // fast.
        let clock = Clock::with_physical_clock(id("n1"), after_restart);
        let far = BEFORE_CRASH + ntp_duration(Duration::from_secs(20 * 3600));
        clock.restore(BEFORE_CRASH, far);
        let next = clock.now();
        assert!(next.time > BEFORE_CRASH);
        assert!(
            next.time < BEFORE_CRASH + ntp_duration(Duration::from_secs(1)),
            "the clock followed the far version"
        );
        // One within the bound is followed, with the margin.
        let clock = Clock::with_physical_clock(id("n1"), after_restart);
        let near = BEFORE_CRASH + ntp_duration(Duration::from_millis(300));
        clock.restore(BEFORE_CRASH, near);
        assert!(clock.now().time > near + LOST_BUMPS_MARGIN);
    }

    /// Physical times for a node that crashed and restarted 100 ms later.
    const BEFORE_CRASH: u64 = 1 << 40;
    fn before_crash() -> uhlc::NTP64 {
        uhlc::NTP64(BEFORE_CRASH)
    }
    fn after_restart() -> uhlc::NTP64 {
        uhlc::NTP64(BEFORE_CRASH + ntp_duration(Duration::from_millis(100)))
    }

    #[test]
    fn after_a_restart_versions_order_after_any_issued_before_it() {
        // Before the crash the clock ran ahead: it saw a peer 400 ms ahead, and issued a write
        // after that, which reached the peers but not this node's disk.
        let clock = Clock::with_physical_clock(id("n1"), before_crash);
        assert!(clock.observe(&Version {
            time: BEFORE_CRASH + ntp_duration(Duration::from_millis(400)),
            node: id("n2"),
        }));
        let lost = clock.now();
        let on_disk = BEFORE_CRASH - 1;

        let clock = Clock::with_physical_clock(id("n1"), after_restart);
        clock.restore(on_disk, on_disk);
        assert!(
            clock.now() > lost,
            "a new write would lose to the older one"
        );
    }

    #[test]
    fn ntp_durations() {
        assert_eq!(ntp_duration(Duration::from_secs(1)), 1 << 32);
        assert_eq!(ntp_duration(Duration::from_millis(500)), 1 << 31);
    }

    #[test]
    fn clock_moves_past_observed_versions() {
        // A frozen physical clock: only observation can move this clock forward.
        let clock = Clock::with_physical_clock(id("n1"), uhlc::zero_clock);
        let seen = v(1 << 20, "n2");
        assert!(clock.observe(&seen));
        assert!(clock.now() > seen);
    }
}

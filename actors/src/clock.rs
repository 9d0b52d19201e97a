//! A node's hybrid logical clock, which issues the versions of its writes, and the clock
//! arithmetic of version times (64-bit NTP timestamps).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::version::{NodeId, Version};

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

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn v(time: u64, node: &str) -> Version {
        Version {
            time,
            node: id(node),
        }
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

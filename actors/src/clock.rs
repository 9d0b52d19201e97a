//! A node's hybrid logical clock, which issues the versions of its writes, and the clock
//! arithmetic of version times (64-bit NTP timestamps).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::version::{NodeId, Version};

/// How far ahead of this node's clock a version from elsewhere may be, unless told otherwise:
/// CockroachDB's default maximum offset between two nodes' clocks.
pub const DEFAULT_MAX_OFFSET: Duration = Duration::from_millis(500);

/// A node's hybrid logical clock. `uhlc` does the clock arithmetic (physical time, logical
/// counter in the low bits, monotonic under concurrent callers); this wrapper attaches the node
/// id, speaks [`Version`], and holds the bound on how far apart two nodes' clocks may be.
///
/// # Clocks that disagree
/// A version far ahead of every clock would win over every write made after it, for as long as
/// it stays ahead: a node whose clock is fast, or a forged Replicate, could pin a key. So:
/// - A version more than [`Clock::max_offset`] ahead of this clock is not taken
///   ([`Clock::beyond_bound`]): the store refuses it, and the peer that sent it holds it and
///   tries again, which succeeds once the clocks agree (or time catches up with it).
/// - Each node learns its peers' clocks on every exchange with them, and one whose clock is
///   more than the bound off from most of its peers' stops issuing versions at all (the
///   coordinator refuses its writes), since its peers would refuse them.
/// - uhlc's own drift bound is the same, so a version the store takes always moves the clock,
///   and uhlc never has one to warn about.
pub struct Clock {
    hlc: uhlc::HLC,
    node: NodeId,
    /// The last version time issued, and after a restart the newest time found on disk: every
    /// new version is above it, so the clock never goes backwards, even if the machine's clock
    /// did while the node was down.
    last: AtomicU64,
    /// Added to the machine's clock, in NTP units: 0 but in tests, which run a node whose clock
    /// is wrong. uhlc reads the machine's clock; the skew is added to what it says and taken
    /// off what it is told, which is the same as a skewed physical clock, since the HLC only
    /// takes maxima and adds ones.
    skew: i64,
    max_offset: Duration,
    /// The machine's clock, as uhlc reads it.
    machine: fn() -> uhlc::NTP64,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("node", &self.node)
            .field("max_offset", &self.max_offset)
            .finish_non_exhaustive()
    }
}

impl Clock {
    /// A clock for `node` reading the system time, with the default bound.
    pub fn new(node: NodeId) -> Self {
        Self::with_max_offset(node, DEFAULT_MAX_OFFSET)
    }

    /// A clock for `node` that takes versions at most `max_offset` ahead of it.
    pub fn with_max_offset(node: NodeId, max_offset: Duration) -> Self {
        Self {
            hlc: uhlc::HLCBuilder::new().with_max_delta(max_offset).build(),
            node,
            last: AtomicU64::new(0),
            skew: 0,
            max_offset,
            machine: uhlc::system_time_clock,
        }
    }

    /// A clock driven by `physical` instead of the system time, for tests.
    pub fn with_physical_clock(node: NodeId, physical: fn() -> uhlc::NTP64) -> Self {
        Self {
            hlc: uhlc::HLCBuilder::new()
                .with_clock(physical)
                .with_max_delta(DEFAULT_MAX_OFFSET)
                .build(),
            node,
            last: AtomicU64::new(0),
            skew: 0,
            max_offset: DEFAULT_MAX_OFFSET,
            machine: physical,
        }
    }

    /// This clock, running `nanos` nanoseconds ahead of the machine's (behind if negative):
    /// for tests of a node whose clock is wrong.
    pub fn skewed_by(mut self, nanos: i64) -> Self {
        self.skew = ntp_from_nanos(nanos);
        self
    }

    /// How far ahead of this clock a version from elsewhere may be.
    pub fn max_offset(&self) -> Duration {
        self.max_offset
    }

    /// The physical time, as this node's clock reads it (skew included), as a version time.
    pub fn physical(&self) -> u64 {
        (self.machine)().as_u64().wrapping_add_signed(self.skew)
    }

    /// How far `time` (a version time) is ahead of this clock, if it is more than
    /// [`Clock::max_offset`]: a version too far in the future to take.
    pub fn beyond_bound(&self, time: u64) -> Option<Duration> {
        let ahead = time.saturating_sub(self.physical());
        (ahead > ntp_duration(self.max_offset)).then(|| duration_from_ntp(ahead))
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
        let now = self.hlc_now();
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

    /// uhlc's reading, skew added.
    fn hlc_now(&self) -> u64 {
        (self.hlc.new_timestamp().get_time().as_u64()).wrapping_add_signed(self.skew)
    }

    /// A fresh version, greater than every version this clock issued or observed before.
    pub fn now(&self) -> Version {
        let hlc = self.hlc_now();
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
    /// `seen` is too far in the future to trust (the bound): the clock does not follow it.
    /// The store takes no version beyond the bound from elsewhere; one recovered from disk
    /// can be, and the store orders its next local write of that key after it anyway.
    pub fn observe(&self, seen: &Version) -> bool {
        if self.beyond_bound(seen.time).is_some() {
            // Not handed to uhlc, which would warn about it, once per call.
            return false;
        }
        // The id inside the uhlc timestamp only breaks ties inside uhlc; ours is `Version::node`.
        let time = seen.time.wrapping_add_signed(self.skew.wrapping_neg());
        let ts = uhlc::Timestamp::new(uhlc::NTP64(time), *self.hlc.get_id());
        self.hlc.update_with_timestamp(&ts).is_ok()
    }
}

/// How far above the newest version on disk a restarted node's clock starts: more writes of
/// one key than a crash can lose (2^24, about 16.8 million: at 100k writes a second to one key,
/// a log that did not sync for 2.8 minutes), yet only 3.9 ms of clock time, so versions after a
/// restart stay close to physical time. See [`Clock::restore`].
pub const LOST_BUMPS_MARGIN: u64 = 1 << 24;

/// Converts a duration to the 64-bit NTP format of version times (32.32 fixed point).
pub fn ntp_duration(d: Duration) -> u64 {
    (d.as_secs() << 32) + ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000)
}

/// Converts a time in the 64-bit NTP format back to a duration.
pub fn duration_from_ntp(ntp: u64) -> Duration {
    Duration::from_secs(ntp >> 32)
        + Duration::from_nanos(((ntp & 0xFFFF_FFFF) * 1_000_000_000) >> 32)
}

/// Nanoseconds (signed) in NTP units.
pub fn ntp_from_nanos(nanos: i64) -> i64 {
    ((i128::from(nanos) << 32) / 1_000_000_000) as i64
}

/// NTP units (signed) in nanoseconds.
pub fn nanos_from_ntp(ntp: i64) -> i64 {
    ((i128::from(ntp) * 1_000_000_000) >> 32) as i64
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
        assert_eq!(duration_from_ntp(3 << 31), Duration::from_millis(1500));
        assert_eq!(ntp_from_nanos(-500_000_000), -(1 << 31));
        assert_eq!(nanos_from_ntp(-(1 << 31)), -500_000_000);
    }

    #[test]
    fn a_version_beyond_the_bound_is_refused_and_does_not_move_the_clock() {
        let clock = Clock::with_max_offset(id("n1"), Duration::from_secs(2));
        let now = clock.physical();
        assert_eq!(clock.beyond_bound(now), None);
        assert_eq!(
            clock.beyond_bound(now + ntp_duration(Duration::from_secs(1))),
            None
        );
        let far = now + ntp_duration(Duration::from_secs(3600));
        let ahead = clock.beyond_bound(far).expect("an hour is past 2 s");
        assert!(ahead > Duration::from_secs(3590) && ahead <= Duration::from_secs(3600));
        assert!(!clock.observe(&v(far, "n2")));
        assert!(clock.now().time < far, "the clock did not follow it");
        // Within the bound, the clock follows.
        let near = clock.physical() + ntp_duration(Duration::from_millis(1500));
        assert!(clock.observe(&v(near, "n2")));
        assert!(clock.now().time > near);
    }

    #[test]
    fn a_skewed_clock_reads_and_judges_from_its_own_time() {
        let hour = 3600 * 1_000_000_000i64;
        let fast = Clock::new(id("n1")).skewed_by(25 * hour);
        let honest = Clock::new(id("n2"));
        let issued = fast.now();
        // What the fast node issues is a day ahead of an honest node's clock, which refuses it;
        // the fast node takes the honest node's versions, which are behind it.
        assert!(honest.beyond_bound(issued.time).unwrap() > Duration::from_secs(24 * 3600));
        assert_eq!(fast.beyond_bound(honest.now().time), None);
        assert!(fast.physical() > honest.physical() + ntp_duration(Duration::from_secs(24 * 3600)));
        // A slow clock's versions move neither its clock nor the bound the wrong way.
        let slow = Clock::new(id("n3")).skewed_by(-hour);
        assert!(slow.now().time < honest.physical());
        assert!(slow.beyond_bound(honest.now().time).is_some());
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

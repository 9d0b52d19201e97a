//! What a node believes about each of its peers: waiting for it, up, down or lagging, what it
//! holds for the peer, and how replication to it has gone. Shared between the peer's
//! replication actor, which sees deliveries, and the coordinator, which sees a full mailbox and
//! reports it all in `Status`.

use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::peer::PeerError;

/// What this node believes about a peer, as last observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Not reached since this node started: not contacted yet, or not listening yet (a cluster
    /// starting up, one node after another). Not a failure until it has been reached once.
    Waiting,
    /// The last exchange succeeded.
    Up,
    /// The last exchange failed, or the peer refuses this node.
    Down,
    /// Its mailbox overflowed: it missed writes and needs a resync.
    Lagging,
}

impl PeerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Up,
            2 => Self::Down,
            3 => Self::Lagging,
            _ => Self::Waiting,
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Waiting => "waiting",
            Self::Up => "up",
            Self::Down => "down",
            Self::Lagging => "lagging",
        })
    }
}

/// Anti-entropy with one peer, counted since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AntiEntropyCounts {
    pub rounds: u64,
    pub failed: u64,
    /// Entries received that were newer than this node's.
    pub pulled: u64,
    /// Entries sent to the peer.
    pub pushed: u64,
}

/// A peer's health, shared between its replication actor (which sees deliveries) and the
/// coordinator (which sees a full mailbox). Atomics, because both sides only ever set flags.
#[derive(Debug)]
pub struct PeerHealth {
    addr: String,
    state: AtomicU8,
    /// Whether "waiting for the peer" has been logged: once is enough.
    waiting_logged: AtomicBool,
    needs_resync: AtomicBool,
    resyncing: AtomicBool,
    backlog: AtomicU64,
    /// Batches and writes the peer has confirmed, since this node started.
    batches: AtomicU64,
    writes: AtomicU64,
    /// Writes handed to the replication actor and not yet answered: waiting for a batch, or in
    /// the batch being delivered.
    in_flight: AtomicU64,
    /// Anti-entropy rounds with the peer that completed and that failed, and the entries they
    /// brought here (pulled) and sent there (pushed), since this node started.
    rounds: AtomicU64,
    rounds_failed: AtomicU64,
    repaired_here: AtomicU64,
    repaired_there: AtomicU64,
    /// Milliseconds after `born` of the last successful exchange, plus one (0: never).
    last_contact: AtomicU64,
    born: Instant,
    /// Whether the peer's clock was last seen beyond the bound, so that a change is logged
    /// once, not on every write.
    clock_beyond: AtomicBool,
    /// Why the peer refused this node when last asked (another cluster, ring or token), until
    /// an exchange succeeds: a down peer that answers is set up wrong, and says how. The flag
    /// spares each delivered batch the lock.
    refusing: AtomicBool,
    refusal: std::sync::Mutex<String>,
}

impl PeerHealth {
    /// Health of the peer at `addr`, not contacted yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            state: AtomicU8::new(PeerState::Waiting as u8),
            waiting_logged: AtomicBool::new(false),
            needs_resync: AtomicBool::new(false),
            resyncing: AtomicBool::new(false),
            backlog: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            rounds_failed: AtomicU64::new(0),
            repaired_here: AtomicU64::new(0),
            repaired_there: AtomicU64::new(0),
            last_contact: AtomicU64::new(0),
            born: Instant::now(),
            clock_beyond: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            refusal: std::sync::Mutex::new(String::new()),
        }
    }

    /// Takes a measurement of the peer's clock (nanoseconds ahead of this node's; negative:
    /// behind) and says whether it is beyond `bound`. A change either way is logged once.
    pub(crate) fn note_clock(&self, offset: i64, bound: Duration) -> bool {
        let beyond = offset.unsigned_abs() > bound.as_nanos() as u64;
        // A load first: on every write, and nearly always unchanged, so the shared line is
        // written only on a change.
        if self.clock_beyond.load(Ordering::Relaxed) != beyond
            && self.clock_beyond.swap(beyond, Ordering::Relaxed) != beyond
        {
            let by = crate::error::human(Duration::from_nanos(offset.unsigned_abs()));
            let side = if offset > 0 { "ahead of" } else { "behind" };
            if beyond {
                tracing::warn!(
                    peer = %self.addr,
                    offset = %by,
                    bound = %crate::error::human(bound),
                    "peer's clock is {by} {side} this node's, past the bound: writes between \
                     them are refused until the clocks agree"
                );
            } else {
                tracing::info!(peer = %self.addr, offset = %by, "peer's clock is within the bound again");
            }
        }
        beyond
    }

    /// The peer's address, as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The state last observed.
    pub fn state(&self) -> PeerState {
        PeerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Writes waiting in the handoff backlog.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    pub(crate) fn set_backlog(&self, writes: usize) {
        self.backlog.store(writes as u64, Ordering::Relaxed);
    }

    /// Batches and writes the peer has confirmed through replication and handoff since this
    /// node started (repairs, by anti-entropy or quorum reads, not counted). Their ratio is the
    /// mean batch size, which says how much batching is saving under the current load.
    pub fn confirmed(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }

    /// Writes waiting for a batch or being delivered to the peer.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn set_in_flight(&self, writes: usize) {
        self.in_flight.store(writes as u64, Ordering::Relaxed);
    }

    /// Anti-entropy with the peer since this node started: rounds completed, rounds failed,
    /// entries pulled from it and entries pushed to it.
    pub fn anti_entropy(&self) -> AntiEntropyCounts {
        AntiEntropyCounts {
            rounds: self.rounds.load(Ordering::Relaxed),
            failed: self.rounds_failed.load(Ordering::Relaxed),
            pulled: self.repaired_here.load(Ordering::Relaxed),
            pushed: self.repaired_there.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_round(&self, outcome: Option<(usize, usize)>) {
        match outcome {
            Some((pulled, pushed)) => {
                self.rounds.fetch_add(1, Ordering::Relaxed);
                self.repaired_here
                    .fetch_add(pulled as u64, Ordering::Relaxed);
                self.repaired_there
                    .fetch_add(pushed as u64, Ordering::Relaxed);
            }
            None => {
                self.rounds_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn count_confirmed(&self, writes: usize) {
        // A batch whose every write was rejected confirmed nothing.
        if writes == 0 {
            return;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// Whether the peer has missed writes that only a resync can bring it.
    pub fn needs_resync(&self) -> bool {
        self.needs_resync.load(Ordering::Relaxed)
    }

    /// Records that the peer missed writes that only anti-entropy can bring it.
    pub fn mark_needs_resync(&self) {
        self.needs_resync.store(true, Ordering::Relaxed);
    }

    /// Whether an anti-entropy round with this peer is running.
    pub fn resyncing(&self) -> bool {
        // Acquire, pairing with `end_resync`: seen stopped, the round's count is seen too.
        self.resyncing.load(Ordering::Acquire)
    }

    /// Marks a round as started; false if one already runs. What the peer needed is taken on
    /// by the round: anything missed while it runs marks the peer again.
    pub(crate) fn begin_resync(&self) -> bool {
        if self.resyncing.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.needs_resync.store(false, Ordering::Relaxed);
        true
    }

    pub(crate) fn end_resync(&self) {
        self.resyncing.store(false, Ordering::Release);
    }

    /// Time since the last successful exchange with the peer, if any.
    pub fn last_contact(&self) -> Option<Duration> {
        match self.last_contact.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.born
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }

    fn contact(&self) {
        let now = self.born.elapsed().as_millis() as u64 + 1;
        self.last_contact.store(now, Ordering::Relaxed);
    }

    /// Records a state, logging the change (and only the change: a dead peer is one log line,
    /// not one per write).
    fn set_state(&self, new: PeerState, reason: &dyn std::fmt::Display) {
        let old = PeerState::from_u8(self.state.swap(new as u8, Ordering::Relaxed));
        if old == new {
            return;
        }
        match new {
            PeerState::Up => tracing::info!(peer = %self.addr, from = %old, "peer up"),
            PeerState::Down => {
                tracing::warn!(peer = %self.addr, from = %old, reason = %reason, "peer down")
            }
            PeerState::Lagging => tracing::warn!(
                peer = %self.addr,
                from = %old,
                reason = %reason,
                "peer lagging, marked for resync"
            ),
            PeerState::Waiting => {}
        }
    }

    /// Whether the peer failed the last exchange: down, or never reached and not answering
    /// when last tried (as a node that is not started yet, or one killed before this node
    /// reached it).
    pub fn unanswered(&self) -> bool {
        match self.state() {
            PeerState::Down => true,
            PeerState::Waiting => self.waiting_logged.load(Ordering::Relaxed),
            PeerState::Up | PeerState::Lagging => false,
        }
    }

    /// Why the peer refuses this node, if it did when last asked and has taken nothing since.
    pub fn refusal(&self) -> Option<String> {
        if !self.refusing.load(Ordering::Relaxed) {
            return None;
        }
        let why = self.refusal.lock().unwrap_or_else(PoisonError::into_inner);
        Some(why.clone()).filter(|why| !why.is_empty())
    }

    pub(crate) fn mark_up(&self) {
        self.contact();
        if self.refusing.load(Ordering::Relaxed) {
            self.refusing.store(false, Ordering::Relaxed);
        }
        // Lagging stays visible until something resyncs the peer: being reachable again does not
        // bring back the writes it missed.
        if self.state() != PeerState::Lagging || !self.needs_resync() {
            self.set_state(PeerState::Up, &"delivered");
        }
    }

    /// An exchange with the peer failed. A peer never reached since the start, and not
    /// answering, is one not started yet (or not yet routable): this node waits for it, and
    /// says so once, rather than warn that it is down. A peer that answered, even to refuse
    /// this node, is down.
    pub(crate) fn mark_down(&self, error: &PeerError) {
        match error {
            PeerError::Refused(why) => {
                *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = why.clone();
                self.refusing.store(true, Ordering::Relaxed);
            }
            _ => self.refusing.store(false, Ordering::Relaxed),
        }
        let unanswered = matches!(error, PeerError::Unreachable(_) | PeerError::TimedOut);
        if self.state() == PeerState::Waiting && unanswered {
            if !self.waiting_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(peer = %self.addr, reason = %error, "waiting for peer: not reached yet");
            }
            return;
        }
        self.set_state(PeerState::Down, error);
    }

    pub(crate) fn mark_lagging(&self) {
        self.needs_resync.store(true, Ordering::Relaxed);
        self.set_state(PeerState::Lagging, &"replication mailbox full");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_refuses_this_node_says_why_until_a_call_goes_through() {
        let h = PeerHealth::new("p");
        assert_eq!(h.refusal(), None);
        h.mark_down(&PeerError::Refused("another cluster".into()));
        assert_eq!(h.state(), PeerState::Down);
        assert_eq!(h.refusal().as_deref(), Some("another cluster"));
        // Gone silent since: the reason is no longer known.
        h.mark_down(&PeerError::TimedOut);
        assert_eq!(h.refusal(), None);
        h.mark_down(&PeerError::Refused("another ring".into()));
        assert_eq!(h.refusal().as_deref(), Some("another ring"));
        h.mark_up();
        assert_eq!(h.refusal(), None);
    }

    #[test]
    fn health_transitions() {
        let h = PeerHealth::new("p");
        assert_eq!(h.state(), PeerState::Waiting);
        assert_eq!(h.last_contact(), None);
        h.mark_up();
        assert_eq!(h.state(), PeerState::Up);
        assert!(
            h.last_contact()
                .is_some_and(|ago| ago < Duration::from_secs(5))
        );
        // Down and back: up again, even with a resync pending (only lagging waits for one).
        h.mark_down(&PeerError::TimedOut);
        h.mark_needs_resync();
        h.mark_up();
        assert_eq!(h.state(), PeerState::Up);
        h.mark_down(&PeerError::TimedOut);
        assert_eq!(h.state(), PeerState::Down);
        h.mark_lagging();
        assert!(h.needs_resync());
        h.mark_up();
        assert_eq!(
            h.state(),
            PeerState::Lagging,
            "reachable again is not caught up"
        );
    }

    #[test]
    fn a_peer_never_reached_is_waited_for_not_down_unless_it_answered() {
        let h = PeerHealth::new("p");
        assert!(!h.unanswered(), "not tried yet");
        h.mark_down(&PeerError::Unreachable("connection refused".into()));
        h.mark_down(&PeerError::TimedOut);
        assert_eq!(h.state(), PeerState::Waiting);
        assert!(h.unanswered(), "tried, and no answer");
        h.mark_up();
        assert!(!h.unanswered());
        h.mark_down(&PeerError::TimedOut);
        assert!(h.unanswered());
        let h = PeerHealth::new("p");
        assert_eq!(h.state().to_string(), "waiting");
        // One that answers to refuse this node is set up wrong, and down.
        h.mark_down(&PeerError::Refused("Unauthenticated: wrong token".into()));
        assert_eq!(h.state(), PeerState::Down);
        // Once reached, a peer that stops answering is down.
        let h = PeerHealth::new("p");
        h.mark_up();
        h.mark_down(&PeerError::Unreachable("connection refused".into()));
        assert_eq!(h.state(), PeerState::Down);
    }

    /// What `f` logs at WARN and above, one line each.
    fn warnings_of(f: impl FnOnce()) -> Vec<String> {
        logged_at(tracing::Level::WARN, f)
    }

    /// What `f` logs at `level` and above, one line each.
    fn logged_at(level: tracing::Level, f: impl FnOnce()) -> Vec<String> {
        type Lines = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;
        thread_local! {
            static CAPTURED: std::cell::RefCell<Option<Lines>> = const { std::cell::RefCell::new(None) };
        }
        /// Writes a line into the capture of the test on this thread, if any.
        struct Capture;
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                CAPTURED.with(|c| {
                    if let Some(lines) = &*c.borrow() {
                        lines.lock().unwrap().extend_from_slice(buf);
                    }
                });
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // One subscriber for every test of this binary, set once, each test capturing what
        // its own thread logs. A subscriber per test raced the other tests' threads: a
        // callsite met first on a thread with none can be cached as never enabled while the
        // test's subscriber registers, and its lines are then lost (seen as an INFO line
        // missing, now and then, right after a build).
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_writer(|| Capture)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other test of this binary sets a subscriber");
        });
        let lines = Lines::default();
        CAPTURED.with(|c| *c.borrow_mut() = Some(lines.clone()));
        f();
        CAPTURED.with(|c| *c.borrow_mut() = None);
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let at_least = |line: &str| {
            (line.split_whitespace().nth(1)).and_then(|l| l.parse::<tracing::Level>().ok())
                <= Some(level)
        };
        text.lines()
            .filter(|l| at_least(l))
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_peers_clock_past_the_bound_is_one_warning_not_one_per_write() {
        let h = PeerHealth::new("db2:5001");
        let bound = Duration::from_millis(500);
        let day = 25 * 3600 * 1_000_000_000i64;
        let warned = warnings_of(|| {
            assert!(!h.note_clock(3_000_000, bound), "3 ms is within");
            for _ in 0..1000 {
                assert!(h.note_clock(day, bound));
            }
            assert!(!h.note_clock(-2_000_000, bound), "back within");
            assert!(h.note_clock(-day, bound), "and past, the other way");
        });
        assert!(
            !h.note_clock(500_000_000, bound),
            "the bound itself is within"
        );
        assert_eq!(warned.len(), 2, "{warned:#?}");
        assert!(
            warned[0].contains("db2:5001") && warned[0].contains("1day 1h ahead of"),
            "{}",
            warned[0]
        );
        assert!(warned[1].contains("1day 1h behind"), "{}", warned[1]);
    }

    #[test]
    fn a_state_is_logged_when_it_changes_not_on_every_exchange() {
        let h = PeerHealth::new("db3:5001");
        let logged = logged_at(tracing::Level::INFO, || {
            for _ in 0..10 {
                h.mark_down(&PeerError::Unreachable("connection refused".into()));
            }
            for _ in 0..10 {
                h.mark_up();
            }
            for _ in 0..10 {
                h.mark_down(&PeerError::TimedOut);
            }
        });
        assert_eq!(logged.len(), 3, "{logged:#?}");
        assert!(logged[0].contains("waiting for peer"), "{}", logged[0]);
        assert!(logged[1].contains("peer up"), "{}", logged[1]);
        assert!(
            logged[2].contains("WARN") && logged[2].contains("peer down"),
            "{}",
            logged[2]
        );
    }

    #[test]
    fn a_resync_starts_once_and_takes_on_what_the_peer_needed() {
        let h = PeerHealth::new("p");
        h.mark_needs_resync();
        assert!(h.begin_resync());
        assert!(h.resyncing() && !h.needs_resync());
        assert!(!h.begin_resync(), "one round at a time");
        h.end_resync();
        assert!(!h.resyncing());
    }
}

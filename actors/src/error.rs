//! The actors crate's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A duration as a person reads it, in units: to the millisecond under a minute ("1s 200ms"),
/// to the second from there ("1day 1h 3s").
pub fn human(d: Duration) -> String {
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    let rounded = if d >= Duration::from_secs(60) {
        Duration::from_secs(ms.saturating_add(500) / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(rounded).to_string()
}

/// What can go wrong inside a node's actors and storage. The node crate maps each case to a
/// gRPC status or a startup failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A change of the ring that cannot be made (see [`crate::ring`]).
    #[error("ring: {0}")]
    Ring(String),
    /// The store actor is not running (the node is shutting down).
    #[error("the store is shutting down")]
    StoreStopped,
    /// A write could not be made durable; it was not acknowledged.
    #[error("write not durable on this node: {0}")]
    Log(LogError),
    /// A data file is damaged where damage cannot be a torn tail. The node will not start on
    /// it rather than silently drop data.
    #[error(
        "{file}: corrupt at offset {offset}: {reason}. To recover, restart with \
         --repair-truncate to cut the file there (what followed is fetched back from peers by \
         anti-entropy), or move the data dir aside and let the node resync from its peers"
    )]
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A write from elsewhere carries a version too far ahead of this node's clock. It is not
    /// applied: it would win over every write made after it until the clocks catch up.
    #[error(
        "{key}: its version is {} ahead of this node's clock, past the {} two clocks may differ \
         (--max-clock-offset): the writer's clock is fast, or the write is forged; not applied",
        human(*ahead),
        human(*bound)
    )]
    AheadOfClock {
        key: String,
        ahead: Duration,
        bound: Duration,
    },
    /// This node's clock is off from most of its peers': it takes no writes, since the
    /// versions it would give them are ones its peers refuse (or, if it is slow, lose to older
    /// writes).
    #[error(
        "this node's clock is {} {} of {off} of its {peers} peers' clocks, past the {} two \
         clocks may differ (--max-clock-offset): it takes no writes until the clocks agree \
         (check NTP on this machine)",
        human(*offset),
        if *ahead { "ahead" } else { "behind" },
        human(*bound)
    )]
    ClockOff {
        /// How far, the median over the peers it disagrees with.
        offset: Duration,
        ahead: bool,
        off: usize,
        peers: usize,
        bound: Duration,
    },
    /// Another process holds the data directory.
    #[error("data dir {0} is in use by another kvstore process")]
    Locked(PathBuf),
    /// A file operation on the data directory failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// An I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why a log write failed: cloneable, because one failure answers every write in its group.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{context}: {message}")]
pub struct LogError {
    pub kind: LogFailure,
    pub context: String,
    pub message: String,
}

/// What kind of trouble the log is in, which decides what a client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFailure {
    /// The disk is full. Writes are refused until the log can write again, and resume by
    /// themselves once there is room.
    DiskFull,
    /// More is waiting for the disk than the log queues: the disk is slower than the writes.
    Backlogged,
    /// The disk did not answer in time.
    Stalled,
    /// Another I/O failure. After a failed fsync the log refuses writes until the node
    /// restarts.
    Failed,
    /// The log has stopped: the node is shutting down.
    Stopped,
}

impl LogError {
    pub fn from_io(context: &str, error: &io::Error) -> Self {
        let kind = match error.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => LogFailure::DiskFull,
            _ => LogFailure::Failed,
        };
        Self {
            kind,
            context: context.to_string(),
            message: error.to_string(),
        }
    }

    /// `queued` bytes are waiting for the disk already.
    pub fn backlogged(queued: u64) -> Self {
        Self {
            kind: LogFailure::Backlogged,
            context: "log".into(),
            message: format!("{queued} bytes are already waiting for the disk; try again shortly"),
        }
    }

    pub fn stopped() -> Self {
        Self {
            kind: LogFailure::Stopped,
            context: "log writer".into(),
            message: "stopped".into(),
        }
    }
}

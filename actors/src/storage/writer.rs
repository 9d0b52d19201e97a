//! The log writer: one thread that owns the current log file and turns the store's appends into
//! group commits.
//!
//! Each group commit is one group frame (see [`super::record`]): everything that queued up
//! while the thread was busy, in one `write`, then one fsync, then every waiter is answered.
//! Each frame also says how much of the file was synced when it was written, which is what lets
//! recovery tell unsynced groups that a power cut tore (cut them off) from damage to synced data
//! (refuse). A sync that no group would record, because nothing was written after it (an
//! interval's sync, the one at start, the last one before close), is recorded by an empty group.
//!
//! # When an append fails
//! The store puts a write in its map before the log has it, so a failed append (a full disk)
//! leaves writes in memory that are not on disk. Two rules keep that from costing an
//! acknowledgement its meaning:
//! - The writer keeps the records of a failed group and writes them before anything else, until
//!   they make it. So an append succeeds only when everything queued before it is durable too:
//!   whoever acknowledges a write on the strength of an append queued after it (a barrier, for
//!   a peer's write the map already held) is telling the truth.
//! - While records are kept that way, [`LogWriter::admit`] refuses every new write with the
//!   failure, before the store touches its map; reads go on. The writer retries on its own
//!   every [`RETRY_EVERY`], and writes resume as soon as the kept records are written.
//!
//! The queue to the thread is bounded in bytes ([`MAX_QUEUED_BYTES`], records kept after a
//! failure included): past it, new writes are refused as backlogged, not buffered without end.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::fs::{AppendFile, DataDir};
use super::record::{self, LOG_HEADER_LEN};
use crate::error::{Error, LogError};

/// Most bytes one group commit writes before it syncs and answers its waiters, so one huge
/// burst does not hold every earlier writer hostage.
const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;
/// How often the writer tries again to write records whose append failed, when nothing else
/// comes to make it try: how soon writes resume once a full disk has room again.
pub const RETRY_EVERY: Duration = Duration::from_millis(200);
/// Most bytes of records queued for the log thread, or kept by it after a failed append, before
/// new writes are refused. A disk slower than the writes coming in then answers "backlogged"
/// instead of buffering without end. One write bigger than this is still taken when nothing is
/// queued.
pub const MAX_QUEUED_BYTES: u64 = 64 * 1024 * 1024;

/// When the log reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync before every acknowledgement (writes waiting together share one fsync).
    Always,
    /// Acknowledge once written to the OS; fsync at this interval. A machine crash can lose
    /// up to one interval of acknowledged writes; a process crash loses nothing.
    Interval(Duration),
    /// Never fsync; the OS decides. A process crash loses nothing, a machine crash can lose
    /// anything not yet written back.
    Never,
}

/// The file name of generation `g`'s log.
pub fn log_name(generation: u64) -> String {
    format!("log-{generation:016}.wal")
}

/// Creates generation `g`'s log with a fresh header, and says the header's nonce. The header
/// is written and synced under a temporary name first, so a crash or a full disk never leaves a
/// log without a header (which recovery would have to refuse); a leftover `.tmp` is deleted at
/// the next start.
///
/// On failure nothing is left behind, not even a renamed file whose directory entry could not
/// be synced: the writer goes on appending to the old log, which must stay the newest one, since
/// recovery reads only the newest log's damaged tail as torn and refuses one in any other.
pub fn create_log(dir: &dyn DataDir, generation: u64) -> io::Result<(Box<dyn AppendFile>, u32)> {
    let name = log_name(generation);
    let tmp = format!("{name}.tmp");
    let nonce = record::new_nonce();
    let mut renamed = false;
    let result = (|| {
        let mut file = dir.create(&tmp)?;
        file.append(&record::log_header(nonce))?;
        file.sync()?;
        dir.rename(&tmp, &name)?;
        renamed = true;
        dir.sync()?;
        Ok((file, nonce))
    })();
    if result.is_err() {
        let _ = dir.remove(if renamed { &name } else { &tmp });
    }
    result
}

enum Command {
    /// Framed records, or none for a barrier.
    Append(Vec<u8>, oneshot::Sender<Result<(), LogError>>),
    Rotate(u64, oneshot::Sender<Result<(), LogError>>),
}

/// What the writer thread and the store both look at.
#[derive(Default)]
struct Shared {
    /// Bytes in the current log file.
    bytes: AtomicU64,
    /// Bytes of records queued for the thread or kept by it after a failed append.
    queued: AtomicU64,
    /// Set while the log cannot take writes, with why: records are kept after a failed append,
    /// or the log is poisoned for good.
    failing: AtomicBool,
    failure: Mutex<Option<LogError>>,
}

impl Shared {
    fn set_failure(&self, error: Option<LogError>) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        self.failing.store(error.is_some(), Ordering::Release);
        *failure = error;
    }

    fn failure(&self) -> Option<LogError> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        (self.failure.lock().unwrap_or_else(PoisonError::into_inner)).clone()
    }
}

/// Handle to the log writer thread. Dropping it stops the thread after it has written and
/// synced what it was given.
pub struct LogWriter {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    stopped: Option<oneshot::Receiver<()>>,
}

/// A promise that a write is in the log (per the sync mode). Resolves to an error if the
/// write could not be made durable.
#[must_use = "a write is only acknowledged once durable"]
pub struct Durable(Option<oneshot::Receiver<Result<(), LogError>>>);

impl Durable {
    /// Already durable: nothing was logged (an in-memory store, or nothing to wait for).
    pub fn ready() -> Self {
        Self(None)
    }

    /// Waits for the log.
    pub async fn wait(self) -> Result<(), Error> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(result) => result.map_err(Error::Log),
                Err(_) => Err(Error::Log(LogError::stopped())),
            },
        }
    }
}

impl LogWriter {
    /// Starts the writer thread on `file`, a log in `dir` whose header holds `nonce`, currently
    /// `len` bytes long, all of them synced. New logs (see [`LogWriter::rotate`]) go in `dir`.
    pub fn start(
        dir: Arc<dyn DataDir>,
        file: Box<dyn AppendFile>,
        len: u64,
        nonce: u32,
        sync: SyncMode,
        metrics: super::StorageMetrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        shared.bytes.store(len, Ordering::Relaxed);
        let (stopped_tx, stopped) = oneshot::channel();
        let mut thread = WriterThread {
            dir,
            file,
            len,
            synced: len,
            marked: LOG_HEADER_LEN as u64,
            nonce,
            group: Vec::new(),
            sync,
            shared: shared.clone(),
            poisoned: None,
            dirty_since: None,
            kept: Vec::new(),
            metrics,
        };
        // Its log lines belong to the node that started it.
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || {
                let _span = span.entered();
                thread.run(rx);
                // Its file and data dir (and the dir's lock) are let go before the close returns.
                drop(thread);
                let _ = stopped_tx.send(());
            })
            .expect("spawning the log writer thread");
        Self {
            tx,
            shared,
            stopped: Some(stopped),
        }
    }

    /// Whether the log takes `bytes` more of records now. Refuses with the log's failure while
    /// it has records it could not write (see the module's doc), or as backlogged when
    /// [`MAX_QUEUED_BYTES`] are already waiting. Called before the store changes its map.
    pub fn admit(&self, bytes: usize) -> Result<(), LogError> {
        if let Some(failure) = self.shared.failure() {
            return Err(failure);
        }
        let queued = self.shared.queued.load(Ordering::Acquire);
        if queued > 0 && queued + bytes as u64 > MAX_QUEUED_BYTES {
            return Err(LogError::backlogged(queued));
        }
        Ok(())
    }

    /// Queues framed records for the log. The promise resolves once they, and everything
    /// queued before them, are durable.
    pub fn append(&self, framed: Vec<u8>) -> Durable {
        self.shared
            .queued
            .fetch_add(framed.len() as u64, Ordering::AcqRel);
        self.send(|done| Command::Append(framed, done))
    }

    /// A promise that resolves once everything queued before it is durable: for a write that
    /// needs no append because the map already holds it, or a newer version, which may itself
    /// still be waiting for its group commit. With nothing unsynced it costs no fsync.
    pub fn barrier(&self) -> Durable {
        self.send(|done| Command::Append(Vec::new(), done))
    }

    /// Switches to a new log file for `generation` once everything queued before is synced.
    pub fn rotate(&self, generation: u64) -> Durable {
        self.send(|done| Command::Rotate(generation, done))
    }

    fn send(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), LogError>>) -> Command,
    ) -> Durable {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::SendError(command)) = self.tx.send(command(done)) {
            let (Command::Append(_, done) | Command::Rotate(_, done)) = command;
            let _ = done.send(Err(LogError::stopped()));
        }
        Durable(Some(rx))
    }

    /// Bytes in the current log file.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Stops the thread after it has written and synced everything queued, and waits for it.
    pub async fn close(mut self) {
        let stopped = self.stopped.take();
        drop(self);
        if let Some(stopped) = stopped {
            let _ = stopped.await;
        }
    }
}

/// Who waits for an append.
type Waiter = oneshot::Sender<Result<(), LogError>>;

struct WriterThread {
    dir: Arc<dyn DataDir>,
    file: Box<dyn AppendFile>,
    /// Length of the file up to the last good append.
    len: u64,
    /// Length of the file as of its last sync: what the next group says is on disk.
    synced: u64,
    /// The highest sync mark written into the file: when `synced` is past it, a crash now would
    /// leave no proof that the bytes between were synced.
    marked: u64,
    /// The current file's nonce, which salts its groups' checksums.
    nonce: u32,
    /// The group frame being written, kept to reuse its allocation.
    group: Vec<u8>,
    sync: SyncMode,
    shared: Arc<Shared>,
    /// Set after a failure that cannot be undone (a failed fsync leaves the page cache in an
    /// unknown state, as PostgreSQL learned); every later write fails until the node restarts.
    poisoned: Option<LogError>,
    /// When the first unsynced byte was written (interval mode).
    dirty_since: Option<Instant>,
    /// Where fsync times and group sizes go.
    metrics: super::StorageMetrics,
    /// Records of groups whose append failed: in the store's map, not yet in the log. Written
    /// before anything else.
    kept: Vec<u8>,
}

impl WriterThread {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        // The file was synced before it was handed over; its last group may not say so.
        self.mark_synced();
        loop {
            let wait = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            let first = match wait {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(cmd) => cmd,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.on_timer();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                },
            };
            // Group commit: everything that queued up while we were busy goes in one write and
            // one fsync.
            let mut buf = Vec::new();
            let mut waiters = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append(bytes, done) => {
                        buf.extend_from_slice(&bytes);
                        waiters.push(done);
                    }
                    Command::Rotate(generation, done) => {
                        self.flush(&mut buf, &mut waiters, true);
                        // A failed flush returns before it syncs, and what was written before
                        // it (under interval sync) must be synced before this log becomes an
                        // earlier one, whose damage is refused. A failed sync poisons the log,
                        // and `rotate` then refuses.
                        self.sync_now();
                        let _ = done.send(self.rotate(generation));
                    }
                }
                if buf.len() < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            let sync = self.sync == SyncMode::Always;
            self.flush(&mut buf, &mut waiters, sync);
            // Under steady load the receive above never times out; sync on schedule anyway.
            if let (SyncMode::Interval(every), Some(since)) = (self.sync, self.dirty_since)
                && since.elapsed() >= every
            {
                self.sync_now();
                self.mark_synced();
            }
        }
        self.flush(&mut Vec::new(), &mut Vec::new(), true);
        self.sync_now();
        // A clean close leaves a log whose every byte a later group vouches for, and whose last
        // group (the mark that does) is synced too.
        if self.mark_synced() || self.len > self.synced {
            self.dirty_since.get_or_insert_with(Instant::now);
            self.sync_now();
        }
    }

    /// When the thread must wake up with nothing received: to retry kept records, or for an
    /// interval's sync.
    fn next_deadline(&self) -> Option<Instant> {
        let retry = (!self.kept.is_empty() && self.poisoned.is_none())
            .then(|| Instant::now() + RETRY_EVERY);
        let interval = match (self.sync, self.dirty_since) {
            (SyncMode::Interval(every), Some(since)) => Some(since + every),
            _ => None,
        };
        retry.into_iter().chain(interval).min()
    }

    fn on_timer(&mut self) {
        if !self.kept.is_empty() {
            self.flush(&mut Vec::new(), &mut Vec::new(), true);
        }
        if let (SyncMode::Interval(every), Some(since)) = (self.sync, self.dirty_since)
            && since.elapsed() >= every
        {
            self.sync_now();
            self.mark_synced();
        }
    }

    /// Writes an empty group whose mark records the last sync, if no group records it yet.
    /// Recovery cuts damage that no later group says was synced, so without it a sync after
    /// the last group (an interval's, the one at start) would leave synced data that damage
    /// could cost rather than stop the node. The group does not make the log dirty: it is
    /// synced with whatever comes next, and an idle log is not synced again for it. Returns
    /// whether it was written. In fsync-before-ack mode the next group records each sync, so
    /// this runs only at start, on the interval's syncs and at close.
    fn mark_synced(&mut self) -> bool {
        if self.poisoned.is_some() || self.synced <= self.marked {
            return false;
        }
        let marker = record::group_header(self.nonce, self.synced, &[]);
        if let Err(e) = self.file.append(&marker) {
            // Nothing waits on it: the next group carries the same mark, or a newer one.
            let error = LogError::from_io("appending a sync mark to the log", &e);
            tracing::warn!(error = %error, "could not record a log sync");
            self.cut_back();
            return false;
        }
        self.len += marker.len() as u64;
        self.marked = self.synced;
        self.shared.bytes.store(self.len, Ordering::Relaxed);
        true
    }

    /// Writes `buf` after whatever records were kept from failed appends, syncs if asked, and
    /// answers the waiters. On failure the records are kept for the next attempt.
    fn flush(&mut self, buf: &mut Vec<u8>, waiters: &mut Vec<Waiter>, sync: bool) {
        let records = if self.kept.is_empty() {
            std::mem::take(buf)
        } else {
            let mut kept = std::mem::take(&mut self.kept);
            kept.append(buf);
            kept
        };
        let result = self.write(&records, sync);
        if !waiters.is_empty() {
            self.metrics
                .group_commit_writes
                .observe(waiters.len() as f64);
        }
        match &result {
            Ok(()) => {
                self.shared
                    .queued
                    .fetch_sub(records.len() as u64, Ordering::AcqRel);
                self.shared.set_failure(None);
            }
            Err(error) => {
                self.kept = records;
                self.shared.set_failure(Some(error.clone()));
            }
        }
        for waiter in waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    fn write(&mut self, records: &[u8], sync: bool) -> Result<(), LogError> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        if !records.is_empty() {
            self.group.clear();
            self.group
                .extend_from_slice(&record::group_header(self.nonce, self.synced, records));
            self.group.extend_from_slice(records);
            if let Err(e) = self.file.append(&self.group) {
                let error = LogError::from_io("appending to the log", &e);
                tracing::error!(error = %error, bytes = records.len(), "log write failed; records kept for a retry");
                self.cut_back();
                return Err(error);
            }
            self.len += self.group.len() as u64;
            self.marked = self.synced;
            self.shared.bytes.store(self.len, Ordering::Relaxed);
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        if sync && self.dirty_since.is_some() {
            self.sync_now();
            if let Some(poisoned) = &self.poisoned {
                return Err(poisoned.clone());
            }
        }
        Ok(())
    }

    /// Cuts off whatever part of a failed append made it, so the log stays a clean prefix and
    /// later appends (once there is space again) land after good data.
    fn cut_back(&mut self) {
        if let Err(e) = self.file.truncate(self.len) {
            self.poison(LogError::from_io(
                "truncating the log after a failed write",
                &e,
            ));
        }
    }

    fn sync_now(&mut self) {
        if self.dirty_since.is_none() || self.poisoned.is_some() {
            return;
        }
        let started = Instant::now();
        let synced = self.file.sync();
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        match synced {
            Ok(()) => {
                self.dirty_since = None;
                self.synced = self.len;
            }
            Err(e) => self.poison(LogError::from_io("syncing the log", &e)),
        }
    }

    fn poison(&mut self, error: LogError) {
        tracing::error!(error = %error, "log failed; refusing writes until restart");
        self.shared.set_failure(Some(error.clone()));
        self.poisoned = Some(error);
    }

    fn rotate(&mut self, generation: u64) -> Result<(), LogError> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        if !self.kept.is_empty() {
            // Records that did not make it into this log must, before it becomes an earlier one.
            return Err(self.shared.failure().unwrap_or_else(LogError::stopped));
        }
        match create_log(&*self.dir, generation) {
            Ok((file, nonce)) => {
                self.file = file;
                self.nonce = nonce;
                // `create_log` synced the header before handing the file over.
                self.len = LOG_HEADER_LEN as u64;
                self.synced = self.len;
                self.marked = self.len;
                self.shared.bytes.store(self.len, Ordering::Relaxed);
                self.dirty_since = None;
                Ok(())
            }
            // The old file is intact and still open: keep appending to it.
            Err(e) => Err(LogError::from_io("starting a new log file", &e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::fs::crash::{CrashDir, Tear};
    use super::super::scan::{OnDamage, scan_log};
    use super::*;
    use crate::testing::write;

    pub(crate) fn framed(key: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        record::encode_write(&write(key, Some("v"), 1, "n"), &mut buf);
        buf
    }

    /// A writer on a new log (generation 0) in `dir`.
    fn writer(dir: &CrashDir, sync: SyncMode) -> LogWriter {
        measured_writer(dir, sync, super::super::StorageMetrics::default())
    }

    fn measured_writer(
        dir: &CrashDir,
        sync: SyncMode,
        metrics: super::super::StorageMetrics,
    ) -> LogWriter {
        let (file, nonce) = create_log(dir, 0).unwrap();
        LogWriter::start(
            Arc::new(dir.clone()),
            file,
            LOG_HEADER_LEN as u64,
            nonce,
            sync,
            metrics,
        )
    }

    #[tokio::test]
    async fn each_group_commit_and_each_fsync_is_measured() {
        let dir = CrashDir::default();
        let metrics = super::super::StorageMetrics::default();
        let w = measured_writer(&dir, SyncMode::Always, metrics.clone());
        w.append(framed("one")).wait().await.unwrap();
        assert_eq!(metrics.group_commit_writes.count(), 1);
        assert_eq!(metrics.group_commit_writes.sum(), 1.0);
        let fsyncs = metrics.fsync_seconds.count();
        assert!(fsyncs >= 1, "the acknowledged write was synced");
        // Three appends queued while the thread is busy share one group and one fsync, or
        // take more groups; either way every write is counted once.
        let pending = [
            w.append(framed("a")),
            w.append(framed("b")),
            w.append(framed("c")),
        ];
        for durable in pending {
            durable.wait().await.unwrap();
        }
        assert_eq!(metrics.group_commit_writes.sum(), 4.0);
        assert!(metrics.fsync_seconds.count() > fsyncs);
        // Without fsync, nothing is measured as one.
        let never = CrashDir::default();
        let unsynced = super::super::StorageMetrics::default();
        let w = measured_writer(&never, SyncMode::Never, unsynced.clone());
        w.append(framed("one")).wait().await.unwrap();
        assert_eq!(unsynced.group_commit_writes.count(), 1);
        assert_eq!(unsynced.fsync_seconds.count(), 0);
    }

    fn log(dir: &CrashDir, generation: u64) -> Vec<u8> {
        dir.contents(&log_name(generation)).expect("the log")
    }

    /// The keys of a whole log, and how its scan ended.
    fn keys_of(data: &[u8]) -> Vec<String> {
        let mut keys = Vec::new();
        scan_log(std::path::Path::new("log"), data, OnDamage::Refuse, |w| {
            keys.push(w.key)
        })
        .unwrap();
        keys
    }

    /// The sync marks of every group of a whole log, in order.
    pub(crate) fn marks_of(data: &[u8]) -> Vec<u64> {
        let nonce = record::check_log_header(data).unwrap();
        let mut at = LOG_HEADER_LEN;
        let mut marks = Vec::new();
        while at < data.len() {
            let group = record::decode_group(&data[at..], nonce).unwrap();
            marks.push(group.synced);
            at += group.used;
        }
        marks
    }

    #[tokio::test]
    async fn appends_are_synced_and_replayable() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        let synced = dir.syncs();
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        assert_eq!(dir.syncs() - synced, 3);
        // What a power cut leaves is every acknowledged append.
        dir.crash(Tear::Nothing);
        assert_eq!(keys_of(&log(&dir, 0)), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn each_group_commit_is_one_group_frame() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        w.append(framed("a")).wait().await.unwrap();
        w.append([framed("b"), framed("c")].concat())
            .wait()
            .await
            .unwrap();
        w.close().await;
        let data = log(&dir, 0);
        let nonce = record::check_log_header(&data).unwrap();
        let mut expected = record::log_header(nonce).to_vec();
        for keys in [&["a"][..], &["b", "c"]] {
            let records: Vec<u8> = keys.iter().flat_map(|k| framed(k)).collect();
            expected.extend(record::group_header(nonce, expected.len() as u64, &records));
            expected.extend(records);
        }
        // A clean close adds an empty group for the last sync.
        expected.extend(record::group_header(nonce, expected.len() as u64, &[]));
        assert_eq!(data, expected);
        assert_eq!(keys_of(&data), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        let synced = dir.syncs();
        let pending: Vec<Durable> = (0..500)
            .map(|i| w.append(framed(&format!("k{i}"))))
            .collect();
        for p in pending {
            p.wait().await.unwrap();
        }
        let syncs = dir.syncs() - synced;
        assert!(
            syncs < 500,
            "group commit should batch: {syncs} syncs for 500 writes"
        );
    }

    #[tokio::test]
    async fn interval_and_never_modes_ack_before_syncing() {
        // An interval no test outlives: the ack cannot have waited for it, and nothing syncs
        // for a while after it either.
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Interval(Duration::from_secs(3600)));
        let synced = dir.syncs();
        w.append(framed("a")).wait().await.unwrap();
        assert_eq!(dir.syncs(), synced, "acked once written, not synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(dir.syncs(), synced, "synced long before the interval");
        // The timer syncs what was written, without any further write.
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Interval(Duration::from_millis(50)));
        let synced = dir.syncs();
        w.append(framed("a")).wait().await.unwrap();
        for _ in 0..1000 {
            if dir.syncs() > synced {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dir.syncs(), synced + 1);

        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Never);
        let synced = dir.syncs();
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        assert_eq!(dir.syncs(), synced);
        w.close().await;
        assert_eq!(
            dir.syncs(),
            synced + 2,
            "a clean stop syncs what is there, then the group that says so"
        );
    }

    #[tokio::test]
    async fn each_group_says_how_much_of_the_file_was_synced_before_it() {
        let header = LOG_HEADER_LEN as u64;
        let mark = record::GROUP_HEADER_LEN as u64;
        // With fsync before every ack: everything before it. A clean close adds an empty group
        // for the last sync.
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        w.close().await;
        let data = log(&dir, 0);
        let group = (data.len() as u64 - header - mark) / 3;
        let ends: Vec<u64> = (0..4).map(|i| header + i * group).collect();
        assert_eq!(marks_of(&data), ends);

        // Never synced while running: only the header, which was synced when the file was made.
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Never);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        w.close().await;
        assert_eq!(marks_of(&log(&dir, 0)), [header, header, header, ends[3]]);

        // Synced now and then: each sync is recorded right away by an empty group, and the
        // groups after it say so too.
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Interval(Duration::from_millis(20)));
        let synced = dir.syncs();
        let settled = |want: &[u64]| {
            let (dir, want) = (dir.clone(), want.to_vec());
            async move {
                let waited = Instant::now();
                loop {
                    let marks = marks_of(&log(&dir, 0));
                    if marks == want {
                        return;
                    }
                    assert!(
                        waited.elapsed() < Duration::from_secs(10),
                        "marks {marks:?}, expected {want:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        w.append(framed("a")).wait().await.unwrap();
        let after_a = header + group;
        settled(&[header, after_a]).await;
        w.append(framed("b")).wait().await.unwrap();
        let after_b = after_a + mark + group;
        settled(&[header, after_a, after_a, after_b]).await;
        // The empty groups do not make the log dirty: an idle log is not synced for them.
        let syncs = dir.syncs();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(dir.syncs(), syncs);
        assert_eq!(syncs - synced, 2);
        w.close().await;
        // The close syncs the last empty group, and needs no other.
        assert_eq!(dir.syncs() - synced, 3);
        assert_eq!(marks_of(&log(&dir, 0)).len(), 4);
    }

    #[tokio::test]
    async fn a_new_log_file_starts_with_only_its_header_synced() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        w.append(framed("a long key, longer than the next"))
            .wait()
            .await
            .unwrap();
        w.rotate(1).wait().await.unwrap();
        w.append(framed("b")).wait().await.unwrap();
        w.close().await;
        let header = LOG_HEADER_LEN as u64;
        assert_eq!(marks_of(&log(&dir, 0)), [header]);
        let second = log(&dir, 1);
        let after_b = second.len() as u64 - record::GROUP_HEADER_LEN as u64;
        assert_eq!(
            marks_of(&second),
            [header, after_b],
            "the old file's synced length does not carry over"
        );
    }

    #[tokio::test]
    async fn a_failed_append_is_kept_and_written_before_anything_after_it() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        w.append(framed("before")).wait().await.unwrap();
        dir.set_full(true);
        let err = w.append(framed("kept")).wait().await.unwrap_err();
        assert!(err.to_string().contains("no storage space"), "{err}");
        // While the records are kept, new writes are refused before they are taken, with the
        // failure; a barrier waits for them, and fails while they cannot be written.
        let refused = w.admit(10).unwrap_err();
        assert_eq!(refused.kind, crate::error::LogFailure::DiskFull);
        // The retries keep their pace: one every RETRY_EVERY, not as fast as the thread runs.
        let ops = dir.ops();
        tokio::time::sleep(RETRY_EVERY / 2).await;
        assert!(
            dir.ops() - ops <= 4,
            "{} retries in half a retry interval",
            dir.ops() - ops
        );
        assert!(w.barrier().wait().await.is_err());
        // Space comes back: the writer's own retry writes them, and writes resume.
        dir.set_full(false);
        let waited = Instant::now();
        while w.admit(10).is_err() {
            assert!(waited.elapsed() < Duration::from_secs(10), "never retried");
            tokio::time::sleep(RETRY_EVERY / 4).await;
        }
        w.append(framed("after")).wait().await.unwrap();
        // What a power cut leaves is the kept write in its place: after the good data, no
        // garbage in between.
        dir.crash(Tear::Nothing);
        assert_eq!(keys_of(&log(&dir, 0)), ["before", "kept", "after"]);
    }

    #[tokio::test]
    async fn a_barrier_after_a_failed_append_succeeds_only_once_it_is_written() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        dir.set_full(true);
        let failed = w.append(framed("a"));
        assert!(failed.wait().await.is_err());
        dir.set_full(false);
        // A barrier right away: it writes the kept records itself (or finds the retry did).
        w.barrier().wait().await.unwrap();
        assert_eq!(keys_of(&log(&dir, 0)), ["a"]);
        assert!(w.admit(10).is_ok());
    }

    #[tokio::test]
    async fn the_queue_to_the_log_is_bounded_in_bytes() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        // Nothing queued: even a write over the whole bound is taken.
        assert!(w.admit(MAX_QUEUED_BYTES as usize + 1).is_ok());
        // The disk is full and a big append is kept: the next that would pass the bound is
        // refused; this time as the disk's failure, which comes first.
        dir.set_full(true);
        let big = vec![0u8; 1024];
        assert!(w.append(big).wait().await.is_err());
        let err = w.admit(MAX_QUEUED_BYTES as usize).unwrap_err();
        assert_eq!(err.kind, crate::error::LogFailure::DiskFull);
        dir.set_full(false);
        w.barrier().wait().await.unwrap();
        assert_eq!(w.shared.queued.load(Ordering::Acquire), 0, "all written");
        // Queued and not yet written counts too: hold the thread inside a write.
        w.shared
            .queued
            .store(MAX_QUEUED_BYTES - 10, Ordering::Release);
        let err = w.admit(11).unwrap_err();
        assert_eq!(err.kind, crate::error::LogFailure::Backlogged);
        assert!(err.to_string().contains("bytes"), "{err}");
        assert!(w.admit(10).is_ok());
        w.shared.queued.store(0, Ordering::Release);
    }

    #[tokio::test]
    async fn a_failed_fsync_poisons_the_log() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        // The first append's sync is the one to fail: the operation after the append.
        dir.die_after(1);
        assert!(w.append(framed("a")).wait().await.is_err());
        dir.crash(Tear::Everything);
        let err = w.append(framed("b")).wait().await.unwrap_err();
        assert!(err.to_string().contains("sync"), "{err}");
        assert!(
            w.barrier().wait().await.is_err(),
            "a barrier reports it too"
        );
        assert!(w.admit(1).is_err(), "writes are refused until restart");
    }

    #[tokio::test]
    async fn a_barrier_resolves_once_what_was_queued_before_it_is_synced() {
        let dir = CrashDir::default();
        let w = writer(&dir, SyncMode::Always);
        let synced = dir.syncs();
        let first = w.append(framed("a"));
        w.barrier().wait().await.unwrap();
        assert_eq!(dir.syncs() - synced, 1, "the append was synced");
        first.wait().await.unwrap();
        // With nothing unsynced, a barrier costs no fsync.
        w.barrier().wait().await.unwrap();
        assert_eq!(dir.syncs() - synced, 1);
    }

    #[test]
    fn a_log_that_cannot_be_created_leaves_nothing_behind() {
        let dir = CrashDir::default();
        for fail_at in 0..5 {
            dir.die_after(fail_at);
            assert!(create_log(&dir, 7).is_err(), "dies at operation {fail_at}");
            dir.crash(Tear::Everything);
            assert_eq!(
                dir.names(),
                Vec::<String>::new(),
                "dies at operation {fail_at}"
            );
        }
        create_log(&dir, 7).unwrap();
        assert_eq!(dir.names(), [log_name(7)]);
    }
}

//! The write-ahead log: a writer thread with group commit, and the scan that replays a log (or
//! a snapshot) and tells a torn tail from damage in the middle.
//!
//! Each group commit is one group frame (see [`record`]): one `write`, then one fsync. Each
//! frame also says how much of the file had been synced when it was written, which is what lets
//! recovery tell unsynced groups that a power cut tore (cut them off) from damage to synced data
//! (refuse). A sync that no group would record, because nothing was written after it (an
//! interval's sync, the one at start, the last one before close), is recorded by an empty group.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::record::{self, FrameError, GROUPED_HEADER_LEN, Header, Record};
use crate::error::{Error, LogError};

/// Magic at the start of every log file.
pub const LOG_MAGIC: &[u8; 8] = b"KVSTLOG\n";
/// Most bytes one group commit writes before it syncs and answers its waiters, so one huge
/// burst does not hold every earlier writer hostage.
const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

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

/// Where log bytes go. The real one is a file; tests use one that fails on demand.
pub trait LogFile: Send + 'static {
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes after a failed append, so a partial write never
    /// sits in the middle of the log.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl LogFile for File {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

/// Opens the log file of a generation, ready for appending after its header, and says the
/// nonce its header holds.
pub type Opener<F> = Box<dyn FnMut(u64) -> io::Result<(F, u32)> + Send>;

/// The path of generation `g`'s log in `dir`.
pub fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log-{generation:016}.wal"))
}

/// Creates generation `g`'s log with a fresh header. The header is written and synced under a
/// temporary name first, so a crash or a full disk never leaves a log without a header (which
/// recovery would have to refuse); a leftover `.tmp` is deleted at the next start.
///
/// On failure nothing is left behind, not even a renamed file whose directory entry could not
/// be synced: the writer goes on appending to the old log, which must stay the newest one, since
/// recovery reads only the newest log's damaged tail as torn and refuses one in any other.
pub fn create_log(dir: &Path, generation: u64) -> io::Result<(File, u32)> {
    let path = log_path(dir, generation);
    let nonce = record::new_nonce();
    let tmp = path.with_extension("wal.tmp");
    let mut renamed = false;
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&record::grouped_header(LOG_MAGIC, nonce))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        renamed = true;
        sync_dir(dir)?;
        Ok((file, nonce))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(if renamed { &path } else { &tmp });
    }
    result
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

enum Command {
    /// Framed records (or none, for a barrier), and, if the caller relies on earlier appends
    /// too, how many appends had failed when it looked (see [`LogWriter::append_after`]).
    Append(Vec<u8>, Waiter),
    Rotate(u64, oneshot::Sender<Result<(), LogError>>),
}

/// Who waits for an append, and the failure count it relies on, if any.
type Waiter = (oneshot::Sender<Result<(), LogError>>, Option<u64>);

/// Handle to the log writer thread. Dropping every handle stops the thread after it has
/// written and synced what it was given.
pub struct LogWriter {
    tx: mpsc::Sender<Command>,
    bytes: Arc<AtomicU64>,
    stopped: Option<oneshot::Receiver<()>>,
    failed: Arc<Failed>,
}

/// Appends that did not make it into the log, as the writer thread found them, kept for the
/// log's owner. Whoever queued an append also hears of its failure through its [`Durable`], but
/// may have stopped listening (a cancelled call); the owner must know regardless, since the
/// writes are in its memory and not on disk.
#[derive(Default)]
struct Failed {
    any: AtomicBool,
    appends: Mutex<Vec<Vec<u8>>>,
    /// Appends that have failed since the writer started.
    count: AtomicU64,
}

/// A promise that a write is in the log (per the sync mode). Resolves to an error if the
/// write could not be made durable.
#[must_use = "a write is only acknowledged once durable"]
pub struct Durable(Option<oneshot::Receiver<Result<(), LogError>>>);

impl Durable {
    /// Already durable: nothing was logged (an in-memory store, or nothing changed).
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
    /// Starts the writer thread on `file`, a log of the current format whose header holds
    /// `nonce`, currently `len` bytes long, all of them synced.
    pub fn start<F: LogFile>(
        file: F,
        len: u64,
        nonce: u32,
        opener: Opener<F>,
        sync: SyncMode,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let bytes = Arc::new(AtomicU64::new(len));
        let (stopped_tx, stopped) = oneshot::channel();
        let mut thread = WriterThread {
            file,
            len,
            synced: len,
            marked: GROUPED_HEADER_LEN as u64,
            nonce,
            group: Vec::new(),
            opener,
            sync,
            bytes: bytes.clone(),
            poisoned: None,
            dirty_since: None,
            failed: Arc::default(),
        };
        let failed = thread.failed.clone();
        std::thread::Builder::new()
            .name("kvstore-log".into())
            .spawn(move || {
                thread.run(rx);
                let _ = stopped_tx.send(());
            })
            .expect("spawning the log writer thread");
        Self {
            tx,
            bytes,
            stopped: Some(stopped),
            failed,
        }
    }

    /// Takes the framed records of every append that failed since the last call, oldest first.
    /// Cheap when there are none (an atomic load), so it can run before every use of the log.
    pub fn take_failed(&self) -> Vec<Vec<u8>> {
        // A load first: the common case (no failure) then writes nothing to the shared line.
        if !self.failed.any.load(Ordering::Acquire)
            || !self.failed.any.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        std::mem::take(&mut *self.failed.appends.lock().expect("log failure list"))
    }

    /// A promise that resolves once everything queued before it is durable, or with the
    /// log's failure. For a write that needs no append because the map already holds it (or a
    /// newer version), which may itself still be waiting for its group commit.
    pub fn barrier(&self) -> Durable {
        self.append(Vec::new())
    }

    /// Queues framed records for the log.
    pub fn append(&self, framed: Vec<u8>) -> Durable {
        self.send_append(framed, None)
    }

    /// How many appends have failed so far: for [`LogWriter::append_after`].
    pub fn failures(&self) -> u64 {
        self.failed.count.load(Ordering::Acquire)
    }

    /// Queues framed records (or none: a barrier) for a caller that relies on earlier appends
    /// too, and had accounted for `failures` failed ones when it looked. If another fails
    /// before this one is synced, this one fails too, though its own bytes made it: what the
    /// caller relied on is not on disk. An append that fails is otherwise not told to the
    /// appends queued behind it, which go on to succeed (a full disk frees up, say).
    pub fn append_after(&self, framed: Vec<u8>, failures: u64) -> Durable {
        self.send_append(framed, Some(failures))
    }

    fn send_append(&self, framed: Vec<u8>, failures: Option<u64>) -> Durable {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Append(framed, (done, failures)))
            .is_err()
        {
            let (done, rx) = oneshot::channel();
            let _ = done.send(Err(LogError::stopped()));
            return Durable(Some(rx));
        }
        Durable(Some(rx))
    }

    /// Switches to a new log file for `generation` once everything queued before is synced.
    pub fn rotate(&self, generation: u64) -> Durable {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Rotate(generation, done));
        Durable(Some(rx))
    }

    /// Bytes in the current log file.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
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

struct WriterThread<F: LogFile> {
    file: F,
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
    opener: Opener<F>,
    sync: SyncMode,
    bytes: Arc<AtomicU64>,
    /// Set after a failure we cannot undo (a failed fsync leaves the page cache in an unknown
    /// state, as PostgreSQL learned); every later write fails until the node restarts.
    poisoned: Option<LogError>,
    /// When the first unsynced byte was written (interval mode).
    dirty_since: Option<Instant>,
    failed: Arc<Failed>,
}

impl<F: LogFile> WriterThread<F> {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        // The file was synced before it was handed over; its last group may not say so.
        self.mark_synced();
        loop {
            let first = match (self.sync, self.dirty_since) {
                (SyncMode::Interval(every), Some(since)) => {
                    match rx.recv_timeout(every.saturating_sub(since.elapsed())) {
                        Ok(cmd) => cmd,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.sync_now();
                            self.mark_synced();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
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
        let mut none = Vec::new();
        self.flush(&mut Vec::new(), &mut none, true);
        self.sync_now();
        // A clean close leaves a log whose every byte a later group vouches for, and whose last
        // group (the mark that does) is synced too.
        if self.mark_synced() || self.len > self.synced {
            self.dirty_since.get_or_insert_with(Instant::now);
            self.sync_now();
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
            if let Err(e) = self.file.truncate(self.len) {
                self.poison(LogError::from_io(
                    "truncating the log after a failed write",
                    &e,
                ));
            }
            return false;
        }
        self.len += marker.len() as u64;
        self.marked = self.synced;
        self.bytes.store(self.len, Ordering::Relaxed);
        true
    }

    /// Writes `buf`, syncs if asked, and answers the waiters.
    fn flush(&mut self, buf: &mut Vec<u8>, waiters: &mut Vec<Waiter>, sync: bool) {
        let result = self.write(buf, sync);
        if result.is_err() && !buf.is_empty() {
            // Recorded before any waiter hears of it: by the time a caller sees the error, the
            // log's owner can find out which writes it concerned.
            self.failed
                .appends
                .lock()
                .expect("log failure list")
                .push(buf.clone());
            self.failed.any.store(true, Ordering::Release);
            self.failed.count.fetch_add(1, Ordering::AcqRel);
        }
        buf.clear();
        let failures = self.failed.count.load(Ordering::Acquire);
        for (w, relied_on) in waiters.drain(..) {
            let result = match (&result, relied_on) {
                (Ok(()), Some(seen)) if failures > seen => Err(LogError::earlier_append_failed()),
                _ => result.clone(),
            };
            let _ = w.send(result);
        }
    }

    fn write(&mut self, buf: &[u8], sync: bool) -> Result<(), LogError> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        if !buf.is_empty() {
            self.group.clear();
            self.group
                .extend_from_slice(&record::group_header(self.nonce, self.synced, buf));
            self.group.extend_from_slice(buf);
            if let Err(e) = self.file.append(&self.group) {
                let error = LogError::from_io("appending to the log", &e);
                tracing::error!(error = %error, bytes = buf.len(), "log write failed");
                // Cut off whatever part of the batch made it, so the log stays a clean prefix
                // and later writes (once there is space again) land after good data.
                if let Err(e) = self.file.truncate(self.len) {
                    self.poison(LogError::from_io(
                        "truncating the log after a failed write",
                        &e,
                    ));
                }
                return Err(error);
            }
            self.len += self.group.len() as u64;
            self.marked = self.synced;
            self.bytes.store(self.len, Ordering::Relaxed);
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

    fn sync_now(&mut self) {
        if self.dirty_since.is_none() || self.poisoned.is_some() {
            return;
        }
        match self.file.sync() {
            Ok(()) => {
                self.dirty_since = None;
                self.synced = self.len;
            }
            Err(e) => self.poison(LogError::from_io("syncing the log", &e)),
        }
    }

    fn poison(&mut self, error: LogError) {
        tracing::error!(error = %error, "log failed; refusing writes until restart");
        self.poisoned = Some(error);
    }

    fn rotate(&mut self, generation: u64) -> Result<(), LogError> {
        if let Some(poisoned) = &self.poisoned {
            return Err(poisoned.clone());
        }
        match (self.opener)(generation) {
            Ok((file, nonce)) => {
                self.file = file;
                self.nonce = nonce;
                // `create_log` synced the header before handing the file over.
                self.len = GROUPED_HEADER_LEN as u64;
                self.synced = self.len;
                self.marked = self.len;
                self.bytes.store(self.len, Ordering::Relaxed);
                self.dirty_since = None;
                Ok(())
            }
            // The old file is intact and still open: keep appending to it.
            Err(e) => Err(LogError::from_io("starting a new log file", &e)),
        }
    }
}

/// How a scan ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanEnd {
    /// Records read.
    pub records: u64,
    /// Bytes of good data (header included): where appending may resume.
    pub good_len: u64,
    /// A torn tail that was found: its offset, length and what was wrong.
    pub torn: Option<(u64, u64, String)>,
}

/// What to do with damage found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDamage {
    /// Damage with nothing good after it is a torn tail (a crash mid-write): drop it. So is
    /// damage that the groups after it say was never synced (format 3). Damage followed by good
    /// records that do not say so is corruption: refuse.
    TornTailOnly,
    /// Refuse on any damage (a file that was complete before it was last closed).
    Refuse,
    /// The operator's repair: cut the file at the first damage, whatever follows.
    Truncate,
}

/// Reads every record of `data` (a whole file whose header is `magic`), handing each to `f`.
pub fn scan(
    path: &Path,
    data: &[u8],
    magic: &[u8; 8],
    on_damage: OnDamage,
    mut f: impl FnMut(Record),
) -> Result<ScanEnd, Error> {
    let header = record::check_header(data, magic).map_err(|reason| Error::Corrupt {
        file: path.to_path_buf(),
        offset: 0,
        reason,
    })?;
    let mut offset = header.len;
    let mut records = 0;
    while offset < data.len() {
        let found = if header.version == record::FORMAT_VERSION {
            record::decode(&data[offset..]).map(|(record, used)| {
                f(record);
                records += 1;
                used
            })
        } else {
            read_group(&data[offset..], &header, |record| {
                f(record);
                records += 1;
            })
        };
        match found {
            Ok(used) => offset += used,
            // Inside a group whose checksum matches: written whole and as it is, so this is not
            // a tear (a record kind from a newer build, say). Only the operator's cut goes on.
            Err(error @ FrameError::InGroup(_)) if on_damage != OnDamage::Truncate => {
                return Err(Error::Corrupt {
                    file: path.to_path_buf(),
                    offset: offset as u64,
                    reason: error.to_string(),
                });
            }
            Err(error) => {
                let after = &data[offset + 1..];
                let good_after = if header.version == record::FORMAT_VERSION {
                    (0..after.len()).find(|&at| record::decode(&after[at..]).is_ok())
                } else {
                    (0..after.len()).find(|&at| {
                        record::decode_group(&after[at..], header.version, header.nonce).is_ok()
                    })
                }
                .map(|at| offset + 1 + at);
                let vouched = good_after.and_then(|at| highest_sync_mark(&data[at..], &header));
                return damaged(
                    path,
                    data,
                    Damage {
                        offset,
                        error: &error,
                        good_after,
                        vouched,
                    },
                    on_damage,
                    records,
                );
            }
        }
    }
    Ok(ScanEnd {
        records,
        good_len: offset as u64,
        torn: None,
    })
}

/// The highest sync mark among the groups in `data` (which starts with one), skipping damage
/// between them; `None` in a format without marks. Marks only grow through a file, but the
/// groups after the first may be damaged too, so every one is read.
fn highest_sync_mark(data: &[u8], header: &Header) -> Option<u64> {
    let mut highest = None;
    let mut at = 0;
    while at < data.len() {
        match record::decode_group(&data[at..], header.version, header.nonce) {
            Ok(group) => {
                highest = highest.max(group.synced);
                at += group.used;
            }
            Err(_) => at += 1,
        }
    }
    highest
}

/// Reads the group frame at the start of `data`, handing its records to `f`; returns the bytes
/// it took. A group is read whole or not at all: nothing of a damaged group reaches `f`.
fn read_group(
    data: &[u8],
    header: &Header,
    mut f: impl FnMut(Record),
) -> Result<usize, FrameError> {
    let group = record::decode_group(data, header.version, header.nonce)?;
    let (bytes, used) = (group.records, group.used);
    let records_start = used - bytes.len();
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        // A group whose checksum matches holds what the writer framed: a record in it that
        // does not parse is not a torn write (see the caller).
        let (record, n) = record::decode(&bytes[at..]).map_err(|e| {
            FrameError::InGroup(format!(
                "{e}, at byte {} of a group whose checksum matches",
                records_start + at
            ))
        })?;
        found.push(record);
        at += n;
    }
    found.into_iter().for_each(&mut f);
    Ok(used)
}

/// Damage a scan found, and what it found after it.
struct Damage<'a> {
    offset: usize,
    error: &'a FrameError,
    /// Where the first valid record or group after the damage starts.
    good_after: Option<usize>,
    /// The highest sync mark of the groups after the damage (format 3).
    vouched: Option<u64>,
}

/// The end of a scan that found damage: a torn tail (damage with nothing valid after it, or
/// that nothing after it says was synced, in the file that may have one), the operator's cut,
/// or the refusal.
fn damaged(
    path: &Path,
    data: &[u8],
    damage: Damage<'_>,
    on_damage: OnDamage,
    records: u64,
) -> Result<ScanEnd, Error> {
    let Damage {
        offset,
        error,
        good_after,
        vouched,
    } = damage;
    let unsynced = vouched.is_some_and(|synced| synced <= offset as u64);
    let reason = match (error, good_after, vouched) {
        (_, Some(at), Some(synced)) if unsynced => format!(
            "{error}; the valid groups after it (from offset {at}) were written when only \
             {synced} bytes were synced, so it was never synced, and neither were they"
        ),
        (_, Some(at), Some(synced)) => format!(
            "{error}; a valid group follows at offset {at}, and says the file was synced up \
             to byte {synced}"
        ),
        (_, Some(at), None) => format!("{error}; a valid record follows at offset {at}"),
        (FrameError::Truncated, None, _) => error.to_string(),
        (_, None, _) => format!("{error}, and nothing valid after it"),
    };
    let torn = (offset as u64, (data.len() - offset) as u64, reason.clone());
    match on_damage {
        OnDamage::Truncate => {}
        OnDamage::TornTailOnly if good_after.is_none() || unsynced => {}
        _ => {
            return Err(Error::Corrupt {
                file: path.to_path_buf(),
                offset: offset as u64,
                reason,
            });
        }
    }
    Ok(ScanEnd {
        records,
        good_len: offset as u64,
        torn: Some(torn),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::store::{Entry, Write};
    use crate::version::Version;

    fn framed(key: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        record::encode_write(
            &Write {
                key: key.into(),
                entry: Entry {
                    value: Some("v".into()),
                    version: Version {
                        time: 1,
                        node: crate::version::NodeId::new("n").unwrap(),
                    },
                },
            },
            &mut buf,
        );
        buf
    }

    /// An in-memory log file that counts syncs and fails on demand.
    #[derive(Clone, Default)]
    struct MemFile {
        data: Arc<Mutex<Vec<u8>>>,
        syncs: Arc<AtomicU64>,
        /// The file's length at each sync.
        synced_at: Arc<Mutex<Vec<u64>>>,
        /// While set, appends wait (the writer thread is then inside one); `appending` counts
        /// the appends that have started.
        block: Arc<AtomicBool>,
        appending: Arc<AtomicU64>,
        fail_writes: Arc<AtomicBool>,
        fail_sync: Arc<AtomicBool>,
    }

    impl LogFile for MemFile {
        fn append(&mut self, data: &[u8]) -> io::Result<()> {
            self.appending.fetch_add(1, Ordering::SeqCst);
            while self.block.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.fail_writes.load(Ordering::Relaxed) {
                // A partial write, then the failure: what a full disk does.
                self.data
                    .lock()
                    .unwrap()
                    .extend_from_slice(&data[..data.len() / 2]);
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            self.data.lock().unwrap().extend_from_slice(data);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            if self.fail_sync.load(Ordering::Relaxed) {
                return Err(io::Error::other("sync failed"));
            }
            let len = self.data.lock().unwrap().len() as u64;
            self.synced_at.lock().unwrap().push(len);
            self.syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.data.lock().unwrap().truncate(len as usize);
            Ok(())
        }
    }

    const NONCE: u32 = 0x5eed;

    fn writer(file: &MemFile, sync: SyncMode) -> LogWriter {
        let mut f = file.clone();
        f.append(&record::grouped_header(LOG_MAGIC, NONCE)).unwrap();
        let opener: Opener<MemFile> = Box::new(|_| Ok((MemFile::default(), NONCE + 1)));
        LogWriter::start(f, GROUPED_HEADER_LEN as u64, NONCE, opener, sync)
    }

    /// A log holding one group per entry of `groups`, as the writer makes it with fsync before
    /// every ack: each group says everything before it was synced.
    fn grouped_log_of(groups: &[&[&str]]) -> Vec<u8> {
        marked_log_of(groups, |start| start)
    }

    /// A log holding one group per entry of `groups`, the one starting at byte `start` saying
    /// that `mark(start)` bytes were synced.
    fn marked_log_of(groups: &[&[&str]], mark: impl Fn(u64) -> u64) -> Vec<u8> {
        let mut data = record::grouped_header(LOG_MAGIC, NONCE).to_vec();
        for keys in groups {
            let records: Vec<u8> = keys.iter().flat_map(|k| framed(k)).collect();
            data.extend(record::group_header(
                NONCE,
                mark(data.len() as u64),
                &records,
            ));
            data.extend(records);
        }
        data
    }

    /// `log` with the empty group a clean close appends, saying all of it was synced.
    fn with_close_mark(mut log: Vec<u8>) -> Vec<u8> {
        log.extend(record::group_header(NONCE, log.len() as u64, &[]));
        log
    }

    /// The sync marks of every group of a whole log, in order.
    fn marks_of(data: &[u8]) -> Vec<u64> {
        let header = record::check_header(data, LOG_MAGIC).unwrap();
        let mut at = header.len;
        let mut marks = Vec::new();
        while at < data.len() {
            let group = record::decode_group(&data[at..], header.version, header.nonce).unwrap();
            marks.push(group.synced.unwrap());
            at += group.used;
        }
        marks
    }

    fn keys_of(data: &[u8], on_damage: OnDamage) -> Result<(Vec<String>, ScanEnd), Error> {
        let mut keys = Vec::new();
        let end = scan(Path::new("log"), data, LOG_MAGIC, on_damage, |r| {
            if let Record::Write(w) = r {
                keys.push(w.key);
            }
        })?;
        Ok((keys, end))
    }

    #[tokio::test]
    async fn each_group_commit_is_one_group_frame() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        w.append(framed("a")).wait().await.unwrap();
        let both = [framed("b"), framed("c")].concat();
        w.append(both).wait().await.unwrap();
        w.close().await;
        let data = file.data.lock().unwrap().clone();
        assert_eq!(
            data,
            with_close_mark(grouped_log_of(&[&["a"], &["b", "c"]]))
        );
        let (keys, end) = keys_of(&data, OnDamage::Refuse).unwrap();
        assert_eq!(
            (keys, end.records),
            (vec!["a".into(), "b".into(), "c".into()], 3)
        );
    }

    #[test]
    fn a_torn_last_group_is_cut_off_whatever_survived_of_it() {
        let good = grouped_log_of(&[&["a"], &["b"]]);
        let last: Vec<&str> = vec!["c"; 200];
        let whole = grouped_log_of(&[&["a"], &["b"], &last]);
        // Its pages reached the disk out of order: one in the middle is zeros, and the records
        // after it are intact. With bare records those would be "valid records after damage",
        // and the node would refuse to start.
        let mut torn = whole.clone();
        torn[good.len() + 2000..good.len() + 2000 + 512].fill(0);
        let (keys, end) = keys_of(&torn, OnDamage::TornTailOnly).unwrap();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(end.good_len, good.len() as u64);
        assert_eq!(end.torn.unwrap().0, good.len() as u64);
        let mut bare = log_of(&[&["a", "b"][..], &last].concat());
        let start = log_of(&["a", "b"]).len();
        bare[start + 2000..start + 2000 + 512].fill(0);
        assert!(
            keys_of(&bare, OnDamage::TornTailOnly).is_err(),
            "format 1 refuses the same tear"
        );
        // Its header did not make it, or only its first part did.
        for cut in [good.len() + 6, good.len() + 100, whole.len() - 1] {
            let (keys, end) = keys_of(&whole[..cut], OnDamage::TornTailOnly).unwrap();
            assert_eq!(
                (keys.len(), end.good_len),
                (2, good.len() as u64),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn log_bytes_inside_a_torn_group_cannot_pass_for_data_after_damage() {
        // What a client's value could hold: a whole record, and a group frame salted with a
        // nonce it guessed. The append carrying it is torn after them.
        let mut inside = vec![b'x'; 20];
        inside.extend(framed("inner"));
        inside.extend(record::group_header(NONCE + 1, 0, &framed("inner")));
        inside.extend(framed("inner"));
        inside.extend([b'x'; 20]);
        let good = grouped_log_of(&[&["a"]]);
        let mut data = good.clone();
        data.extend(record::group_header(NONCE, good.len() as u64, &inside));
        data.extend(&inside[..inside.len() - 10]);
        let (keys, end) = keys_of(&data, OnDamage::TornTailOnly).unwrap();
        assert_eq!((keys, end.good_len), (vec!["a".into()], good.len() as u64));
        // With bare records (format 1), the same bytes read as a valid record after damage.
        let mut bare = log_of(&["a"]);
        bare.extend(&inside[..inside.len() - 10]);
        assert!(keys_of(&bare, OnDamage::TornTailOnly).is_err());
    }

    #[test]
    fn a_whole_group_that_does_not_read_is_refused_even_at_the_end() {
        // Its checksum matches, so it was written whole: not a tear, though nothing follows.
        let good = grouped_log_of(&[&["a"]]);
        let mut data = good.clone();
        let unreadable = [framed("b"), vec![0xEE; 30]].concat();
        data.extend(record::group_header(NONCE, good.len() as u64, &unreadable));
        data.extend(&unreadable);
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("offset {}", good.len())), "{err}");
        let (keys, end) = keys_of(&data, OnDamage::Truncate).unwrap();
        assert_eq!((keys, end.good_len), (vec!["a".into()], good.len() as u64));
        // And a damaged nonce is a damaged header, not a log of torn groups.
        let mut data = grouped_log_of(&[&["a"], &["b"]]);
        data[12] ^= 1;
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains("offset 0") && err.contains("header"), "{err}");
    }

    #[test]
    fn damage_to_a_group_with_groups_after_it_is_refused() {
        let mut data = grouped_log_of(&[&["a"], &["b"], &["c"]]);
        let second = grouped_log_of(&[&["a"]]).len();
        data[second + record::GROUP_HEADER_LEN + 10] ^= 0xFF;
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("offset {second}")), "{err}");
        assert!(err.contains("synced up to byte"), "{err}");
        let (keys, end) = keys_of(&data, OnDamage::Truncate).unwrap();
        assert_eq!((keys, end.good_len), (vec!["a".into()], second as u64));
    }

    #[test]
    fn unsynced_groups_torn_with_intact_ones_after_them_are_cut_off() {
        // `--sync interval`: "a" was synced, then "b", "c" and "d" were written and a power cut
        // took "c"'s pages but not "d"'s. "d" says only "a" was synced when it was written.
        let groups: &[&[&str]] = &[&["a"], &["b"], &["c"], &["d"]];
        let first_end = grouped_log_of(&groups[..1]).len() as u64;
        let whole = marked_log_of(groups, |start| start.min(first_end));
        let third = grouped_log_of(&groups[..2]).len();
        let mut data = whole.clone();
        data[third + 30..third + 40].fill(0);
        let (keys, end) = keys_of(&data, OnDamage::TornTailOnly).unwrap();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(end.good_len, third as u64);
        let (offset, len, reason) = end.torn.unwrap();
        assert_eq!((offset, len), (third as u64, (data.len() - third) as u64));
        assert!(reason.contains("never synced"), "{reason}");

        // The same damage to "a", which "b" and everything after say was synced: refused.
        let mut data = whole.clone();
        let first = record::GROUPED_HEADER_LEN;
        data[first + 30] ^= 0xFF;
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("offset {first}")), "{err}");

        // Damage to "b" with a damaged "c" between it and "d": "d" still speaks for it.
        let mut data = whole.clone();
        let second = first_end as usize;
        data[second + 30] ^= 0xFF;
        data[third + 30] ^= 0xFF;
        let (keys, end) = keys_of(&data, OnDamage::TornTailOnly).unwrap();
        assert_eq!((keys, end.good_len), (vec!["a".into()], first_end));
        // ...and when a later group says "b" was synced, it is refused however far away it is.
        let all_synced = grouped_log_of(groups);
        let mut data = all_synced.clone();
        data[second + 30] ^= 0xFF;
        data[third + 30] ^= 0xFF;
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("offset {second}")), "{err}");
        let synced_by_d = third + grouped_log_of(&[&["c"]]).len() - GROUPED_HEADER_LEN;
        assert!(
            err.contains(&format!("synced up to byte {synced_by_d}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_new_log_file_starts_with_only_its_header_synced() {
        let (first, second) = (MemFile::default(), MemFile::default());
        let mut f = first.clone();
        f.append(&record::grouped_header(LOG_MAGIC, NONCE)).unwrap();
        let next = second.clone();
        let opener: Opener<MemFile> = Box::new(move |_| {
            let mut f = next.clone();
            f.append(&record::grouped_header(LOG_MAGIC, NONCE + 1))?;
            Ok((f, NONCE + 1))
        });
        let w = LogWriter::start(
            f,
            GROUPED_HEADER_LEN as u64,
            NONCE,
            opener,
            SyncMode::Always,
        );
        w.append(framed("a long key, longer than the next"))
            .wait()
            .await
            .unwrap();
        w.rotate(1).wait().await.unwrap();
        w.append(framed("b")).wait().await.unwrap();
        w.close().await;
        let header = GROUPED_HEADER_LEN as u64;
        assert_eq!(marks_of(&first.data.lock().unwrap()), [header]);
        let after_b = header + grouped_log_of(&[&["b"]]).len() as u64 - header;
        assert_eq!(
            marks_of(&second.data.lock().unwrap()),
            [header, after_b],
            "the old file's synced length does not carry over"
        );
    }

    #[test]
    fn logs_of_format_2_are_read_and_their_damage_is_judged_as_before() {
        let mut data =
            record::grouped_header_of(record::GROUPED_FORMAT_VERSION, LOG_MAGIC, NONCE).to_vec();
        let mut starts = Vec::new();
        for key in ["a", "b", "c"] {
            starts.push(data.len());
            let records = framed(key);
            data.extend(record::v2_group_header(NONCE, &records));
            data.extend(records);
        }
        let (keys, end) = keys_of(&data, OnDamage::TornTailOnly).unwrap();
        assert_eq!(
            (keys, end.good_len),
            (vec!["a".into(), "b".into(), "c".into()], data.len() as u64)
        );
        // A torn last group is cut off.
        let (keys, _) = keys_of(&data[..data.len() - 2], OnDamage::TornTailOnly).unwrap();
        assert_eq!(keys, ["a", "b"]);
        // With no sync marks, damage with a group after it is refused, whatever the sync mode was.
        data[starts[1] + 20] ^= 0xFF;
        let err = keys_of(&data, OnDamage::TornTailOnly)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("offset {}", starts[1])), "{err}");
    }

    #[tokio::test]
    async fn each_group_says_how_much_of_the_file_was_synced_before_it() {
        let header = GROUPED_HEADER_LEN as u64;
        let mark = record::GROUP_HEADER_LEN as u64;
        // With fsync before every ack: everything before it. A clean close adds an empty group
        // for the last sync.
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        w.close().await;
        let data = file.data.lock().unwrap().clone();
        let group = (data.len() as u64 - header - mark) / 3;
        let ends: Vec<u64> = (0..4).map(|i| header + i * group).collect();
        assert_eq!(marks_of(&data), ends);

        // Never synced while running: only the header, which was synced when the file was made.
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Never);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        w.close().await;
        assert_eq!(
            marks_of(&file.data.lock().unwrap()),
            [header, header, header, ends[3]]
        );

        // Synced now and then: each sync is recorded right away by an empty group, and the
        // groups after it say so too.
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Interval(Duration::from_millis(20)));
        let settled = |want: &[u64]| {
            let (file, want) = (file.clone(), want.to_vec());
            async move {
                let waited = Instant::now();
                loop {
                    let marks = marks_of(&file.data.lock().unwrap());
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
        let syncs = file.syncs.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(file.syncs.load(Ordering::Relaxed), syncs);
        assert_eq!(syncs, 2);
        w.close().await;
        // The close syncs the last empty group, and needs no other.
        assert_eq!(file.syncs.load(Ordering::Relaxed), 3);
        assert_eq!(marks_of(&file.data.lock().unwrap()).len(), 4);
    }

    #[tokio::test]
    async fn an_append_that_relies_on_earlier_ones_fails_if_one_of_them_does() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        // An append is being written when the disk fills up.
        file.block.store(true, Ordering::SeqCst);
        file.fail_writes.store(true, Ordering::SeqCst);
        let before = file.appending.load(Ordering::SeqCst);
        let first = w.append(framed("a"));
        let waited = Instant::now();
        while file.appending.load(Ordering::SeqCst) == before {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the append never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Queued behind it: one that relies on it (a peer's older write of a key whose newest
        // version is in "a"), and a plain barrier.
        let relying = w.append_after(Vec::new(), w.failures());
        let plain = w.barrier();
        file.block.store(false, Ordering::SeqCst);
        assert!(first.wait().await.is_err(), "the disk was full");
        let err = relying.wait().await.unwrap_err().to_string();
        assert!(err.contains("earlier append failed"), "{err}");
        // With nothing of its own to write, a plain barrier succeeds: the gap the other closes.
        assert!(plain.wait().await.is_ok());
        // A failure it had accounted for does not fail it.
        file.fail_writes.store(false, Ordering::SeqCst);
        w.append_after(framed("b"), w.failures())
            .wait()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn appends_are_synced_and_replayable() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        assert_eq!(file.syncs.load(Ordering::Relaxed), 3);
        w.close().await;
        let data = file.data.lock().unwrap().clone();
        let mut keys = Vec::new();
        let end = scan(Path::new("mem"), &data, LOG_MAGIC, OnDamage::Refuse, |r| {
            if let Record::Write(w) = r {
                keys.push(w.key)
            }
        })
        .unwrap();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(end.good_len, data.len() as u64);
    }

    #[tokio::test]
    async fn concurrent_appends_share_fsyncs() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        let pending: Vec<Durable> = (0..500)
            .map(|i| w.append(framed(&format!("k{i}"))))
            .collect();
        for p in pending {
            p.wait().await.unwrap();
        }
        let syncs = file.syncs.load(Ordering::Relaxed);
        assert!(
            syncs < 500,
            "group commit should batch: {syncs} syncs for 500 writes"
        );
    }

    #[tokio::test]
    async fn interval_and_never_modes_ack_before_syncing() {
        // An interval no test outlives: the ack cannot have waited for it.
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Interval(Duration::from_secs(3600)));
        w.append(framed("a")).wait().await.unwrap();
        assert_eq!(
            file.syncs.load(Ordering::Relaxed),
            0,
            "acked once written, not synced"
        );
        // The timer syncs what was written, without any further write.
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Interval(Duration::from_millis(50)));
        w.append(framed("a")).wait().await.unwrap();
        for _ in 0..1000 {
            if file.syncs.load(Ordering::Relaxed) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(file.syncs.load(Ordering::Relaxed), 1);

        let file = MemFile::default();
        let w = writer(&file, SyncMode::Never);
        for k in ["a", "b", "c"] {
            w.append(framed(k)).wait().await.unwrap();
        }
        assert_eq!(file.syncs.load(Ordering::Relaxed), 0);
        w.close().await;
        assert_eq!(
            file.syncs.load(Ordering::Relaxed),
            2,
            "a clean stop syncs what is there, then the group that says so"
        );
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_write_and_leaves_a_clean_log() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        w.append(framed("before")).wait().await.unwrap();
        file.fail_writes.store(true, Ordering::Relaxed);
        let err = w.append(framed("lost")).wait().await.unwrap_err();
        assert!(err.to_string().contains("no storage space"), "{err}");
        // The writer kept what it could not write, for the log's owner to learn of.
        assert_eq!(w.take_failed(), [framed("lost")]);
        assert!(w.take_failed().is_empty(), "reported once");
        // Space comes back: writing resumes after the good data, no garbage in between.
        file.fail_writes.store(false, Ordering::Relaxed);
        w.append(framed("after")).wait().await.unwrap();
        let data = file.data.lock().unwrap().clone();
        let mut keys = Vec::new();
        scan(Path::new("mem"), &data, LOG_MAGIC, OnDamage::Refuse, |r| {
            if let Record::Write(w) = r {
                keys.push(w.key)
            }
        })
        .unwrap();
        assert_eq!(keys, ["before", "after"]);
    }

    #[tokio::test]
    async fn a_failed_fsync_poisons_the_log() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        file.fail_sync.store(true, Ordering::Relaxed);
        assert!(w.append(framed("a")).wait().await.is_err());
        file.fail_sync.store(false, Ordering::Relaxed);
        let err = w.append(framed("b")).wait().await.unwrap_err();
        assert!(err.to_string().contains("sync"), "{err}");
        assert!(
            w.barrier().wait().await.is_err(),
            "a barrier reports it too"
        );
        assert_eq!(w.take_failed(), [framed("a"), framed("b")]);
    }

    #[tokio::test]
    async fn a_barrier_resolves_once_what_was_queued_before_it_is_synced() {
        let file = MemFile::default();
        let w = writer(&file, SyncMode::Always);
        let first = w.append(framed("a"));
        w.barrier().wait().await.unwrap();
        assert_eq!(
            file.syncs.load(Ordering::Relaxed),
            1,
            "the append was synced"
        );
        first.wait().await.unwrap();
        // With nothing unsynced, a barrier costs no fsync.
        w.barrier().wait().await.unwrap();
        assert_eq!(file.syncs.load(Ordering::Relaxed), 1);
    }

    fn log_of(keys: &[&str]) -> Vec<u8> {
        let mut data = record::header(LOG_MAGIC).to_vec();
        for k in keys {
            data.extend(framed(k));
        }
        data
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let mut data = log_of(&["a", "b"]);
        let good = data.len();
        data.extend(&framed("c")[..10]);
        let mut n = 0;
        let end = scan(
            Path::new("x"),
            &data,
            LOG_MAGIC,
            OnDamage::TornTailOnly,
            |_| n += 1,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(end.good_len, good as u64);
        let (offset, len, _) = end.torn.unwrap();
        assert_eq!((offset, len), (good as u64, 10));
        // A garbage (not just short) last record is a torn tail too.
        let mut data = log_of(&["a"]);
        data.extend([0xAB; 40]);
        assert!(
            scan(
                Path::new("x"),
                &data,
                LOG_MAGIC,
                OnDamage::TornTailOnly,
                |_| ()
            )
            .unwrap()
            .torn
            .is_some()
        );
    }

    #[test]
    fn damage_in_the_middle_is_refused_with_file_and_offset() {
        let mut data = log_of(&["a", "b", "c"]);
        let second = record::HEADER_LEN + framed("a").len();
        data[second + 10] ^= 0xFF;
        let err = scan(
            Path::new("/data/log-1.wal"),
            &data,
            LOG_MAGIC,
            OnDamage::TornTailOnly,
            |_| (),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/data/log-1.wal") && err.contains(&format!("offset {second}")),
            "{err}"
        );
        // The operator's repair cuts there instead.
        let mut n = 0;
        let end = scan(Path::new("x"), &data, LOG_MAGIC, OnDamage::Truncate, |_| {
            n += 1
        })
        .unwrap();
        assert_eq!((n, end.good_len), (1, second as u64));
        // A file that must be whole refuses even a torn tail.
        let mut torn = log_of(&["a"]);
        torn.push(7);
        assert!(scan(Path::new("x"), &torn, LOG_MAGIC, OnDamage::Refuse, |_| ()).is_err());
    }
}

//! Durable storage for one node: a write-ahead log plus snapshots, in the node's data dir.
//!
//! # Why a hand-written log
//! What a node must persist is small and simple: an ordered stream of versioned writes, and
//! now and then the whole map. The requirements on it are precise (a checksum per record, a
//! torn tail cut off with a warning, damage in the middle refused with the file and offset,
//! group commit, compaction that never stalls writers) and each is a few dozen lines here,
//! where an embedded database (redb, fjall) would bring its own log, its own compaction and its
//! own idea of corruption on top of ours. Last-writer-wins versions make the log easy: records
//! are idempotent, so replay order across a fuzzy snapshot and the log after it does not
//! matter.
//!
//! # Layout
//! - [`record`]: the bytes of log records, group frames and snapshots.
//! - [`writer`]: the log writer thread: group commit, sync modes, failed appends.
//! - [`scan`]: reading files back, and telling a torn tail from damage.
//! - [`snapshot`]: writing and reading snapshots.
//! - [`fs`]: the seam to the operating system, which tests replace with a disk that crashes.
//!
//! # Files
//! - `log-G.wal`: generation G's log (see [`record`] for its frames).
//! - `snapshot-G.snap`: every entry (tombstones included) as of some instant after log G
//!   began. Complete by construction (written to `.tmp`, synced, renamed).
//! - `LOCK`: held (flock) while a node runs, so two nodes never share a data dir.
//!
//! # Recovery
//! Load the newest snapshot S, then replay every log with G >= S in order, keeping the newest
//! version per key. Only the last log may end in torn groups (a crash mid-append); they are cut
//! off with a warning. Damage to synced data stops the node with the file and offset, unless
//! the operator asks for `--repair-truncate` ([`scan`] says how the two are told apart). A file
//! of a format this build does not know is refused by its format number.
//!
//! # Compaction
//! When the current log passes a size, the writer rotates to generation G+1 (everything before
//! is synced first), and a background thread snapshots the live map as generation G+1, then
//! deletes older logs and snapshots. Writers never wait for it. Tombstones past their grace
//! period are left out of the snapshot and handed back to the store, which purges them from
//! the map (it owns every change to it).

pub mod fs;
pub mod metrics;
pub mod record;
pub mod scan;
pub mod snapshot;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use crate::entry::{Map, Put, Slot, Write, map_with_capacity};
use crate::error::Error;
use crate::version::{NodeId, Version};
use fs::{DataDir, OsDir};
pub use metrics::StorageMetrics;
use scan::OnDamage;
pub use writer::{Durable, SyncMode};

/// How long after a compaction that failed (a full disk, say) the next may start: not on every
/// append, which would start a thread each time.
const COMPACTION_RETRY: Duration = Duration::from_secs(10);

/// Settings of a node's storage.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub sync: SyncMode,
    /// Log size that triggers a snapshot and a new log.
    pub compact_after_bytes: u64,
    /// Cut damaged files at the damage instead of refusing to start.
    pub repair: bool,
    /// Tombstones older than this are dropped at the next snapshot.
    pub tombstone_grace: Duration,
    /// Where the log's measurements go.
    pub metrics: StorageMetrics,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    pub snapshot: Option<PathBuf>,
    pub snapshot_entries: u64,
    pub log_records: u64,
    pub torn_bytes: u64,
    pub keys: usize,
}

/// Tombstones a snapshot left out, for the store to purge: the keys, and the version time
/// below which a tombstone had expired. A key written since holds no such tombstone any more.
#[derive(Debug)]
pub struct Purge {
    pub keys: Vec<Box<str>>,
    pub before: u64,
}

/// A node's open storage: appends writes and compacts in the background.
pub struct Storage {
    dir: Arc<dyn DataDir>,
    /// The store's map, as recovered here: compaction snapshots it.
    map: Arc<Map>,
    writer: writer::LogWriter,
    generation: u64,
    compact_after_bytes: u64,
    tombstone_grace: Duration,
    compaction: Arc<Compaction>,
    metrics: StorageMetrics,
    purges: mpsc::Receiver<Purge>,
    purge_tx: mpsc::Sender<Purge>,
}

/// Whether a compaction is running, and when the next may start after one failed.
#[derive(Default)]
struct Compaction {
    running: AtomicBool,
    not_before: Mutex<Option<Instant>>,
}

/// What [`Storage::open`] returns: the recovered map, the newest version times in it (the clock
/// starts from them), and the storage ready for appends.
pub struct Recovered {
    pub map: Arc<Map>,
    pub max_time: u64,
    /// The newest version time of each node that wrote what was recovered.
    pub newest_by_node: HashMap<NodeId, u64>,
    /// How many of the map's entries are tombstones (counted as they were applied, so that
    /// the store need not walk a million keys again to learn it).
    pub tombstones: usize,
    pub storage: Storage,
    pub report: RecoveryReport,
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn log_generation(name: &str) -> Option<u64> {
    generation_of(name, "log-", ".wal")
}

fn snapshot_generation(name: &str) -> Option<u64> {
    generation_of(name, "snapshot-", ".snap")
}

impl Storage {
    /// Opens (creating if needed) and locks the data dir at `path`, and recovers its contents.
    pub fn open(path: &Path, config: &StorageConfig) -> Result<Recovered, Error> {
        Self::open_in(Arc::new(OsDir::open(path)?), config)
    }

    /// Recovers the contents of `dir` and opens its log for appending.
    pub fn open_in(dir: Arc<dyn DataDir>, config: &StorageConfig) -> Result<Recovered, Error> {
        let listed = |e| Error::io(format!("listing {}", dir.path().display()))(e);
        let mut logs = Vec::new();
        let mut snapshots = Vec::new();
        for name in dir.list().map_err(listed)? {
            if let Some(g) = log_generation(&name) {
                logs.push(g);
            } else if let Some(g) = snapshot_generation(&name) {
                snapshots.push(g);
            } else if name.ends_with(".tmp") {
                // An unfinished log or snapshot from a crash: never renamed, so never trusted.
                let _ = dir.remove(&name);
            }
        }
        logs.sort_unstable();
        snapshots.sort_unstable();

        let sized_for = (snapshots.last()).map_or(0, |&g| {
            snapshot::entries_hint(&*dir, &snapshot::snapshot_name(g))
        });
        let map = map_with_capacity(sized_for);
        let mut max_time = 0u64;
        let mut newest_by_node = HashMap::new();
        let mut tombstones = 0usize;
        let mut apply = |key: &str, version: Version, value: Option<&str>| {
            max_time = max_time.max(version.time);
            let newest = newest_by_node.entry(version.node).or_insert(0);
            *newest = version.time.max(*newest);
            let slot = Slot::of(key, version, value);
            match map.put_if(slot, |held| held.loses_to_parts(version, value)) {
                Put::Added => tombstones += usize::from(value.is_none()),
                Put::Replaced(old) => {
                    tombstones -= usize::from(old.is_tombstone());
                    tombstones += usize::from(value.is_none());
                }
                Put::Kept => {}
            }
        };
        // A snapshot names a handful of writers a million times over: look each up here before
        // the process-wide table.
        let mut writers: Vec<(Box<str>, NodeId)> = Vec::new();
        let mut writer = |name: &str| match writers.iter().find(|(n, _)| &**n == name) {
            Some(&(_, id)) => id,
            None => {
                let id = NodeId::known(name);
                writers.push((name.into(), id));
                id
            }
        };

        let mut report = RecoveryReport::default();
        let base = snapshots.last().copied().unwrap_or(0);
        if let Some(&g) = snapshots.last() {
            let name = snapshot::snapshot_name(g);
            report.snapshot_entries = snapshot::read(&*dir, &name, config.repair, |w| {
                let version = Version {
                    time: w.time,
                    node: writer(w.node),
                };
                apply(w.key, version, w.value);
            })?;
            report.snapshot = Some(dir.path().join(name));
            // The header's count is not checksummed: one far above what the file held was
            // damaged, and the room it took is given back.
            if sized_for / 2 > report.snapshot_entries as usize + 1024 {
                tracing::warn!(
                    said = sized_for,
                    held = report.snapshot_entries,
                    "a snapshot's header gave a wrong entry count; its entries were read whole"
                );
                map.shrink_to_fit();
            }
        }
        for &g in logs.iter().filter(|&&g| g < base) {
            // Left over from a compaction that crashed before cleaning up: the snapshot covers it.
            let _ = dir.remove(&writer::log_name(g));
        }
        let live: Vec<u64> = logs.iter().copied().filter(|&g| g >= base).collect();
        let mut tail = None;
        for (i, &g) in live.iter().enumerate() {
            let name = writer::log_name(g);
            let path = dir.path().join(&name);
            let io = |what: &str| Error::io(format!("{what} {}", path.display()));
            let data = dir.read(&name).map_err(io("reading"))?;
            let last = i + 1 == live.len();
            let on_damage = match (config.repair, last) {
                (true, _) => OnDamage::Truncate,
                (false, true) => OnDamage::TornTailOnly,
                // Earlier logs were synced whole before the rotation that closed them.
                (false, false) => OnDamage::Refuse,
            };
            let end = scan::scan_log(&path, &data, on_damage, |w| {
                apply(&w.key, w.entry.version, w.entry.value.as_deref());
            })?;
            report.log_records += end.records;
            let mut file = None;
            if let Some(torn) = &end.torn {
                let what = if config.repair {
                    "cut the log at the damage, as --repair-truncate asked"
                } else {
                    "cut off a damaged log tail that nothing after it says was synced (torn by \
                     a crash; acknowledged only under --sync interval or never)"
                };
                tracing::warn!(
                    file = %path.display(),
                    offset = torn.offset,
                    dropped_bytes = torn.len,
                    reason = %torn.reason,
                    "{what}"
                );
                report.torn_bytes += torn.len;
                let mut cut = dir.open_append(&name).map_err(io("opening"))?;
                cut.truncate(end.good_len)
                    .and_then(|()| cut.sync())
                    .map_err(io("truncating"))?;
                file = Some(cut);
            }
            if last {
                let nonce = record::check_log_header(&data).expect("the scan checked the header");
                let mut file = match file {
                    Some(file) => file,
                    None => dir.open_append(&name).map_err(io("opening"))?,
                };
                // The writer's groups say the file is synced up to where it starts: make it so.
                // After a process crash (not a power cut) the last appends may be only in the
                // page cache.
                file.sync().map_err(io("syncing"))?;
                tail = Some((g, file, end.good_len, nonce));
            }
        }
        let (generation, file, len, nonce) = match tail {
            Some(tail) => tail,
            None => {
                let (file, nonce) = writer::create_log(&*dir, base).map_err(Error::io(format!(
                    "creating a log in {}",
                    dir.path().display()
                )))?;
                (base, file, record::LOG_HEADER_LEN as u64, nonce)
            }
        };
        let writer = writer::LogWriter::start(
            dir.clone(),
            file,
            len,
            nonce,
            config.sync,
            config.metrics.clone(),
        );
        report.keys = map.len();
        let map = Arc::new(map);
        let (purge_tx, purges) = mpsc::channel();
        Ok(Recovered {
            map: map.clone(),
            max_time,
            newest_by_node,
            tombstones,
            storage: Storage {
                dir,
                map,
                writer,
                generation,
                compact_after_bytes: config.compact_after_bytes,
                tombstone_grace: config.tombstone_grace,
                compaction: Arc::default(),
                metrics: config.metrics.clone(),
                purges,
                purge_tx,
            },
            report,
        })
    }

    /// Whether the log takes `bytes` more of records now (see [`writer::LogWriter::admit`]):
    /// asked before a write changes the map, so that a write the log cannot take is refused
    /// whole.
    pub fn admit(&self, bytes: usize) -> Result<(), Error> {
        self.writer.admit(bytes).map_err(Error::Log)
    }

    /// Logs `writes` as one append, so that they share one group commit (one fsync) rather
    /// than wake the log thread once each and maybe straddle two of its groups. The promise
    /// resolves once they, and everything logged before them, are durable. Compacts in the
    /// background when the log has grown past its limit.
    pub fn append<'a>(&mut self, writes: impl IntoIterator<Item = &'a Write>) -> Durable {
        let mut framed = Vec::new();
        for write in writes {
            record::encode_write(write, &mut framed);
        }
        let durable = self.writer.append(framed);
        if self.writer.bytes() > self.compact_after_bytes {
            self.compact();
        }
        durable
    }

    /// A promise that resolves once everything logged so far is durable.
    pub fn barrier(&self) -> Durable {
        self.writer.barrier()
    }

    /// Bytes in the current log.
    pub fn log_bytes(&self) -> u64 {
        self.writer.bytes()
    }

    /// How long tombstones are kept.
    pub fn tombstone_grace(&self) -> Duration {
        self.tombstone_grace
    }

    /// Tombstones the last snapshots left out, for the store to purge.
    pub fn take_purges(&self) -> impl Iterator<Item = Purge> + '_ {
        self.purges.try_iter()
    }

    /// Rotates the log and writes a snapshot in the background, unless a compaction is running
    /// or one failed a moment ago.
    fn compact(&mut self) {
        let not_before = *self
            .compaction
            .not_before
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if not_before.is_some_and(|at| Instant::now() < at)
            || self.compaction.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let next = self.generation + 1;
        let rotated = self.writer.rotate(next);
        self.generation = next;
        let (dir, map, compaction) = (self.dir.clone(), self.map.clone(), self.compaction.clone());
        let metrics = self.metrics.clone();
        let purges = self.purge_tx.clone();
        let purge_before = crate::clock::now_minus(self.tombstone_grace);
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("kvstore-compact".into())
            .spawn(move || {
                let _span = span.entered();
                let result = futures::executor::block_on(rotated.wait()).and_then(|()| {
                    let encoded = snapshot::encode(&map, Some(purge_before));
                    snapshot::write(&*dir, next, &encoded)?;
                    remove_older_than(&*dir, next);
                    tracing::info!(
                        generation = next,
                        entries = encoded.entries,
                        bytes = encoded.bytes.len(),
                        expired_tombstones = encoded.expired.len(),
                        "snapshot written, older logs dropped"
                    );
                    metrics.snapshots.inc();
                    if !encoded.expired.is_empty() {
                        let _ = purges.send(Purge {
                            keys: encoded.expired,
                            before: purge_before,
                        });
                    }
                    Ok(())
                });
                if let Err(error) = result {
                    metrics.snapshots_failed.inc();
                    tracing::error!(%error, "compaction failed; keeping the logs, retrying later");
                    *compaction
                        .not_before
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) =
                        Some(Instant::now() + COMPACTION_RETRY);
                }
                compaction.running.store(false, Ordering::Release);
            })
            .expect("spawning the compaction thread");
    }

    /// Whether a compaction is running.
    #[cfg(test)]
    fn compacting(&self) -> bool {
        self.compaction.running.load(Ordering::Acquire)
    }

    /// Stops the log writer once everything queued is written and synced.
    pub async fn close(self) {
        self.writer.close().await;
    }
}

/// Deletes logs and snapshots of generations below `generation`.
fn remove_older_than(dir: &dyn DataDir, generation: u64) {
    let Ok(names) = dir.list() else {
        return;
    };
    for name in names {
        let g = log_generation(&name).or_else(|| snapshot_generation(&name));
        if g.is_some_and(|g| g < generation) {
            let _ = dir.remove(&name);
        }
    }
    let _ = dir.sync();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::fs::crash::{CrashDir, Tear};
    use super::*;
    use crate::testing::write as write_by;

    /// Durable settings with no compaction.
    pub(crate) fn config() -> StorageConfig {
        StorageConfig {
            sync: SyncMode::Always,
            compact_after_bytes: u64::MAX,
            repair: false,
            tombstone_grace: Duration::from_secs(3600),
            metrics: StorageMetrics::default(),
        }
    }

    fn write(key: &str, value: Option<&str>, time: u64) -> Write {
        write_by(key, value, time, "n1")
    }

    fn open(dir: &CrashDir, config: &StorageConfig) -> Result<Recovered, Error> {
        Storage::open_in(Arc::new(dir.clone()), config)
    }

    /// Opens, appends `writes` (applying them to the map as the store would), closes, and
    /// opens again.
    async fn append_all(dir: &CrashDir, config: &StorageConfig, writes: &[Write]) -> Recovered {
        let mut r = open(dir, config).unwrap();
        for w in writes {
            r.map.put(Slot::new(&w.key, &w.entry));
            r.storage.append([w]).wait().await.unwrap();
        }
        r.storage.close().await;
        open(dir, config).unwrap()
    }

    fn value(r: &Recovered, key: &str) -> Option<Option<String>> {
        r.map.get(key).map(|e| e.value_str().map(String::from))
    }

    #[tokio::test]
    async fn writes_survive_a_restart_newest_version_wins() {
        let dir = CrashDir::default();
        let r = append_all(
            &dir,
            &config(),
            &[
                write("a", Some("1"), 10),
                write("b", Some("2"), 11),
                write("a", None, 12),
                write("c", None, 13),
                write("c", Some("3"), 14),
                write("d", Some("4"), 16),
                write("d", None, 15),
            ],
        )
        .await;
        assert_eq!(value(&r, "a"), Some(None), "the tombstone is recovered");
        assert_eq!(value(&r, "b"), Some(Some("2".into())));
        assert_eq!(
            value(&r, "c"),
            Some(Some("3".into())),
            "a newer write revives"
        );
        assert_eq!(
            value(&r, "d"),
            Some(Some("4".into())),
            "an older delete loses"
        );
        assert_eq!(r.max_time, 16);
        assert_eq!(r.report.log_records, 7);
        assert_eq!(r.tombstones, 1, "tombstones counted as they were applied");
    }

    #[tokio::test]
    async fn a_real_data_dir_is_recovered_and_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Storage::open(tmp.path(), &config()).unwrap();
        r.storage
            .append([&write("k", Some("v"), 1)])
            .wait()
            .await
            .unwrap();
        let err = Storage::open(tmp.path(), &config()).err().unwrap();
        assert!(matches!(err, Error::Locked(_)), "{err}");
        r.storage.close().await;
        drop(r.map);
        let r = Storage::open(tmp.path(), &config()).unwrap();
        assert_eq!(value(&r, "k"), Some(Some("v".into())));
    }

    #[tokio::test]
    async fn recovery_settles_two_writes_under_one_version_as_apply_does() {
        let (apple, banana) = (write("k", Some("apple"), 7), write("k", Some("banana"), 7));
        for order in [[&apple, &banana], [&banana, &apple]] {
            let writes: Vec<Write> = order.into_iter().cloned().collect();
            let r = append_all(&CrashDir::default(), &config(), &writes).await;
            assert_eq!(value(&r, "k"), Some(Some("banana".into())), "{order:?}");
        }
    }

    #[tokio::test]
    async fn a_batch_logged_as_one_append_is_recovered_record_by_record() {
        let dir = CrashDir::default();
        let batch = [
            write("a", Some("1"), 10),
            write("b", Some("2"), 11),
            write("a", Some("3"), 12),
        ];
        let mut r = open(&dir, &config()).unwrap();
        r.storage.append(&batch).wait().await.unwrap();
        r.storage.close().await;
        let r = open(&dir, &config()).unwrap();
        assert_eq!(r.report.log_records, 3);
        assert_eq!(value(&r, "a"), Some(Some("3".into())));
        assert_eq!(value(&r, "b"), Some(Some("2".into())));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = CrashDir::default();
        drop(
            append_all(
                &dir,
                &config(),
                &[write("a", Some("1"), 1), write("b", Some("2"), 2)],
            )
            .await,
        );
        let log = writer::log_name(0);
        let mut data = dir.contents(&log).unwrap();
        let good = data.len();
        // Half a group, as a crash mid-append leaves it.
        let mut records = Vec::new();
        record::encode_write(&write("c", Some("3"), 3), &mut records);
        let nonce = record::check_log_header(&data).unwrap();
        let mut group = record::group_header(nonce, good as u64, &records).to_vec();
        group.extend(records);
        data.extend(&group[..group.len() / 2]);
        dir.set_contents(&log, data);
        let r = append_all(&dir, &config(), &[write("d", Some("4"), 4)]).await;
        assert_eq!(value(&r, "c"), None);
        assert_eq!(
            value(&r, "d"),
            Some(Some("4".into())),
            "appends resume after the cut"
        );
        assert_eq!(r.report.torn_bytes, 0, "the second open found a clean log");
        assert!(dir.contents(&log).unwrap().len() > good);
    }

    #[tokio::test]
    async fn a_log_of_another_format_is_refused_by_its_number() {
        let dir = CrashDir::default();
        drop(append_all(&dir, &config(), &[write("a", Some("1"), 1)]).await);
        let log = writer::log_name(0);
        let mut data = dir.contents(&log).unwrap();
        data[8..12].copy_from_slice(&2u32.to_le_bytes());
        dir.set_contents(&log, data);
        let err = open(&dir, &config()).err().unwrap().to_string();
        assert!(
            err.contains(&log)
                && err.contains("format version 2")
                && err.contains("only version 3"),
            "{err}"
        );
    }

    /// Flips a byte inside the first group of `log` and checks that opening refuses it,
    /// naming the group's offset.
    fn refuses_damage_to_its_first_group(dir: &CrashDir, cfg: &StorageConfig) {
        let log = writer::log_name(0);
        let mut data = dir.contents(&log).unwrap();
        data[record::LOG_HEADER_LEN + 25] ^= 0xFF;
        dir.set_contents(&log, data);
        let err = open(dir, cfg).err().unwrap().to_string();
        assert!(
            err.contains(&format!("offset {}", record::LOG_HEADER_LEN)),
            "{:?}: {err}",
            cfg.sync
        );
    }

    #[tokio::test]
    async fn after_a_power_cut_under_interval_sync_the_unsynced_groups_are_cut_off() {
        let dir = CrashDir::default();
        let mut cfg = config();
        cfg.sync = SyncMode::Interval(Duration::from_secs(3600));
        let writes: Vec<Write> = ["a", "b", "c", "d"]
            .iter()
            .zip(1..)
            .map(|(k, t)| write(k, Some("v"), t))
            .collect();
        let mut r = open(&dir, &cfg).unwrap();
        for w in &writes {
            r.storage.append([w]).wait().await.unwrap();
        }
        // The power cut: none of the four was synced (the interval never came), and what the
        // page cache wrote back holds all but part of "b".
        let log = writer::log_name(0);
        let mut on_disk = dir.contents(&log).unwrap();
        drop(r);
        let group = record::GROUP_HEADER_LEN + record::encoded_len(&writes[0]);
        let second = record::LOG_HEADER_LEN + group;
        on_disk[second + 25..second + 30].fill(0);
        dir.crash(Tear::Nothing);
        dir.set_contents(&log, on_disk);

        // The node starts, with what precedes the tear; "c" and "d" were never synced either.
        let r = open(&dir, &cfg).unwrap();
        assert_eq!(r.map.len(), 1);
        assert_eq!(value(&r, "a"), Some(Some("v".into())));
        assert_eq!(r.report.torn_bytes, 3 * group as u64);
        r.storage.close().await;

        // A restart syncs the log before writing on, and groups written from then on say so:
        // damage to "a" is now damage to synced data.
        let r = append_all(&dir, &cfg, &[write("e", Some("v"), 5)]).await;
        assert_eq!(r.map.len(), 2);
        r.storage.close().await;
        refuses_damage_to_its_first_group(&dir, &cfg);
    }

    #[tokio::test]
    async fn damage_to_groups_a_clean_close_synced_is_refused_in_every_sync_mode() {
        for sync in [
            SyncMode::Interval(Duration::from_secs(3600)),
            SyncMode::Never,
        ] {
            let dir = CrashDir::default();
            let mut cfg = config();
            cfg.sync = sync;
            let mut r = open(&dir, &cfg).unwrap();
            for w in [write("a", Some("1"), 1), write("b", Some("2"), 2)] {
                r.storage.append([&w]).wait().await.unwrap();
            }
            // No group after "a" was written after a sync: only the close's own mark says
            // that "a" reached the disk.
            r.storage.close().await;
            refuses_damage_to_its_first_group(&dir, &cfg);
        }
    }

    #[tokio::test]
    async fn mid_log_damage_refuses_to_start_until_repaired() {
        let dir = CrashDir::default();
        let mut cfg = config();
        let writes: Vec<Write> = (0..5)
            .map(|i| write(&format!("k{i}"), Some("v"), i))
            .collect();
        drop(append_all(&dir, &cfg, &writes).await);
        let log = writer::log_name(0);
        let mut data = dir.contents(&log).unwrap();
        // One group per append (each waited for its sync).
        let second =
            record::LOG_HEADER_LEN + record::GROUP_HEADER_LEN + record::encoded_len(&writes[0]);
        data[second + 12] ^= 0x55;
        dir.set_contents(&log, data);

        let err = open(&dir, &cfg).err().unwrap().to_string();
        assert!(err.contains(&log), "{err}");
        assert!(err.contains(&format!("offset {second}")), "{err}");
        assert!(err.contains("--repair-truncate"), "{err}");

        cfg.repair = true;
        let r = open(&dir, &cfg).unwrap();
        assert_eq!(r.map.len(), 1, "only what precedes the damage");
    }

    /// Waits for a running compaction to settle.
    async fn settle(storage: &Storage) {
        for _ in 0..1000 {
            if !storage.compacting() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("compaction did not settle");
    }

    #[tokio::test]
    async fn compaction_snapshots_drops_old_logs_and_hands_back_old_tombstones() {
        let dir = CrashDir::default();
        let mut cfg = config();
        cfg.compact_after_bytes = 2_000;
        cfg.tombstone_grace = Duration::from_secs(60);
        let recent = crate::clock::now_minus(Duration::ZERO);
        let ancient = crate::clock::now_minus(Duration::from_secs(3600));
        let mut writes = vec![
            write("old-delete", None, ancient),
            write("new-delete", None, recent),
        ];
        writes.extend((0..200).map(|i| write(&format!("k{i:03}"), Some("value"), recent + i)));
        let mut r = open(&dir, &cfg).unwrap();
        for w in &writes {
            r.map.put(Slot::new(&w.key, &w.entry));
            r.storage.append([w]).wait().await.unwrap();
        }
        settle(&r.storage).await;
        // The expired tombstone was left out of the snapshot and handed to the store; the
        // recent one was not.
        let purged: Vec<Box<str>> = r.storage.take_purges().flat_map(|p| p.keys).collect();
        assert!(purged.contains(&"old-delete".into()), "{purged:?}");
        assert!(!purged.contains(&"new-delete".into()), "{purged:?}");
        r.storage.close().await;

        let names = dir.names();
        let logs = names.iter().filter(|f| f.ends_with(".wal")).count();
        let snaps = names.iter().filter(|f| f.ends_with(".snap")).count();
        assert!(snaps == 1, "older snapshots are dropped: {names:?}");
        assert!(logs <= 2, "older logs are dropped: {names:?}");

        let r = open(&dir, &cfg).unwrap();
        assert!(r.report.snapshot.is_some());
        for i in 0..200 {
            assert_eq!(value(&r, &format!("k{i:03}")), Some(Some("value".into())));
        }
        assert_eq!(
            value(&r, "new-delete"),
            Some(None),
            "recent tombstones stay"
        );
        assert_eq!(
            value(&r, "old-delete"),
            None,
            "tombstones past the grace period go"
        );
    }

    #[tokio::test]
    async fn a_damaged_snapshot_is_refused() {
        let dir = CrashDir::default();
        let map = crate::entry::new_map();
        map.put(Slot::new("k", &write("k", Some("v"), 1).entry));
        snapshot::write(&dir, 3, &snapshot::encode(&map, None)).unwrap();
        let name = snapshot::snapshot_name(3);
        let mut data = dir.contents(&name).unwrap();
        data[20] ^= 1;
        dir.set_contents(&name, data);
        let err = open(&dir, &config()).err().unwrap().to_string();
        assert!(err.contains("snapshot-0000000000000003.snap"), "{err}");
    }

    /// The model check: a node writes, rotates and compacts while its process dies after each
    /// operation on its files in turn, with what a power cut (or only a process crash) leaves.
    /// Every time, recovery starts, and holds every write whose append was acknowledged before
    /// the death.
    #[tokio::test]
    async fn a_crash_at_any_step_keeps_every_acknowledged_write() {
        let mut cfg = config();
        cfg.compact_after_bytes = 600;
        let writes: Vec<Write> = (0..24)
            .map(|i| write(&format!("k{i:02}"), Some("some value"), 100 + i))
            .collect();
        // How many operations a whole run takes: each death point below is one of them.
        let all = {
            let dir = CrashDir::default();
            run_until_death(&dir, &cfg, &writes).await;
            dir.ops()
        };
        assert!(all > 40, "{all} operations");
        for tear in [Tear::Nothing, Tear::Half, Tear::Everything] {
            for death in 0..all {
                let dir = CrashDir::default();
                // The data dir exists before the process that dies.
                open(&dir, &cfg).unwrap().storage.close().await;
                dir.die_after(death);
                let acked = run_until_death(&dir, &cfg, &writes).await;
                dir.crash(tear);
                let r = open(&dir, &cfg).unwrap_or_else(|e| {
                    panic!("dead after {death} operations, {tear:?}: recovery failed: {e}")
                });
                for w in &acked {
                    assert_eq!(
                        value(&r, &w.key).flatten().as_deref(),
                        w.entry.value.as_deref(),
                        "dead after {death} operations, {tear:?}: {} was acknowledged",
                        w.key
                    );
                }
            }
        }
    }

    /// Appends `writes` one by one, as the store would (map first), until the log fails;
    /// returns the ones acknowledged.
    async fn run_until_death(dir: &CrashDir, cfg: &StorageConfig, writes: &[Write]) -> Vec<Write> {
        let Ok(mut r) = open(dir, cfg) else {
            return Vec::new();
        };
        let mut acked = Vec::new();
        for w in writes {
            if r.storage.admit(100).is_err() {
                break;
            }
            r.map.put(Slot::new(&w.key, &w.entry));
            match r.storage.append([w]).wait().await {
                Ok(()) => acked.push(w.clone()),
                Err(_) => break,
            }
            // Let a compaction that started run to its end, or to the death.
            settle(&r.storage).await;
        }
        r.storage.close().await;
        acked
    }
}

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
//! # Files
//! - `log-G.wal`: generation G's log. Header (magic `KVSTLOG\n`, format version, nonce), then
//!   one group frame per group commit, holding framed records (`len | crc32 | payload`), one per
//!   applied write, and saying how much of the file was synced when it was written. Logs of
//!   older formats (bare records; groups without that mark) are read as such, and a node that
//!   finds one as its newest log starts a new one.
//! - `snapshot-G.snap`: every entry (tombstones included) as of some instant after log G
//!   began. Complete by construction (written to `.tmp`, synced, renamed).
//! - `LOCK`: held (flock) while a node runs, so two nodes never share a data dir.
//!
//! # Recovery
//! Load the newest snapshot S, then replay every log with G >= S in order, keeping the newest
//! version per key. Only the last log may end in torn groups (a crash mid-append); they are cut
//! off with a warning. With `SyncMode::Always` only the last group can be unsynced; with the
//! other modes several can be, in any state after a power cut, intact ones after torn ones. A
//! damaged group is cut off, with everything after it, when no later group says it had been
//! synced. Every sync is recorded, by the next group or by an empty one written for it, so
//! damage to synced data stops the node with the file and offset, unless the operator asks for
//! `--repair-truncate`. (The exception needs two faults: a power cut that takes the empty group
//! recording the last sync, and damage to the synced groups before it, which then reads like a
//! torn tail, as damage to the last group always has.)
//!
//! # Compaction
//! When the current log passes a size, the writer rotates to generation G+1 (everything before
//! is synced first), and a background thread snapshots the live map as generation G+1, then
//! deletes older logs and snapshots. Writers never wait for it.

pub mod record;
pub mod snapshot;
pub mod wal;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::Error;
use crate::store::{Map, Slot, Write};
use crate::version::Version;
pub use wal::{Durable, SyncMode};

/// Settings of a node's storage.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub dir: PathBuf,
    pub sync: SyncMode,
    /// Log size that triggers a snapshot and a new log.
    pub compact_after_bytes: u64,
    /// Cut damaged files at the damage instead of refusing to start.
    pub repair: bool,
    /// Tombstones older than this are dropped at the next snapshot.
    pub tombstone_grace: Duration,
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

/// A node's open storage: appends writes and compacts in the background.
pub struct Storage {
    dir: PathBuf,
    writer: wal::LogWriter,
    generation: u64,
    compact_after_bytes: u64,
    tombstone_grace: Duration,
    compacting: Arc<AtomicBool>,
    /// Held for as long as the node runs.
    _lock: File,
}

/// What [`Storage::open`] returns: the recovered map, the newest version times in it (the clock
/// starts from them), and the storage ready for appends.
pub struct Recovered {
    pub map: Map,
    pub max_time: u64,
    /// The newest version time of each node that wrote what was recovered.
    pub newest_by_node: std::collections::HashMap<crate::version::NodeId, u64>,
    pub storage: Storage,
    pub report: RecoveryReport,
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

impl Storage {
    /// Opens (creating if needed) the data dir and recovers its contents.
    pub fn open(config: &StorageConfig) -> Result<Recovered, Error> {
        let dir = &config.dir;
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path)
            .map_err(Error::io(format!("opening {}", lock_path.display())))?;
        if lock.try_lock().is_err() {
            return Err(Error::Locked(dir.clone()));
        }

        let mut logs = Vec::new();
        let mut snapshots = Vec::new();
        for item in
            std::fs::read_dir(dir).map_err(Error::io(format!("listing {}", dir.display())))?
        {
            let item = item.map_err(Error::io(format!("listing {}", dir.display())))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if let Some(g) = generation_of(&name, "log-", ".wal") {
                logs.push(g);
            } else if let Some(g) = generation_of(&name, "snapshot-", ".snap") {
                snapshots.push(g);
            } else if name.ends_with(".tmp") {
                // An unfinished snapshot from a crash: never renamed, so never trusted.
                let _ = std::fs::remove_file(item.path());
            }
        }
        logs.sort_unstable();
        snapshots.sort_unstable();

        let map = crate::store::new_map();
        let mut max_time = 0u64;
        let mut newest_by_node = std::collections::HashMap::new();
        let mut apply = |w: Write| {
            max_time = max_time.max(w.entry.version.time);
            let newest = newest_by_node.entry(w.entry.version.node).or_insert(0);
            *newest = w.entry.version.time.max(*newest);
            match map.entry(w.key.into_boxed_str()) {
                dashmap::Entry::Occupied(mut slot) => {
                    if slot.get().loses_to(&w.entry) {
                        slot.insert(Slot::new(&w.entry));
                    }
                }
                dashmap::Entry::Vacant(slot) => {
                    slot.insert(Slot::new(&w.entry));
                }
            }
        };

        let mut report = RecoveryReport::default();
        let base = snapshots.last().copied().unwrap_or(0);
        if let Some(&g) = snapshots.last() {
            let path = snapshot::snapshot_path(dir, g);
            report.snapshot_entries = snapshot::read(&path, config.repair, &mut apply)?;
            report.snapshot = Some(path);
        }
        for &g in logs.iter().filter(|&&g| g < base) {
            // Left over from a compaction that crashed before cleaning up: the snapshot covers it.
            let _ = std::fs::remove_file(wal::log_path(dir, g));
        }
        let live: Vec<u64> = logs.iter().copied().filter(|&g| g >= base).collect();
        let mut tail = None;
        for (i, &g) in live.iter().enumerate() {
            let path = wal::log_path(dir, g);
            let data =
                std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let last = i + 1 == live.len();
            let on_damage = match (config.repair, last) {
                (true, _) => wal::OnDamage::Truncate,
                (false, true) => wal::OnDamage::TornTailOnly,
                // Earlier logs were synced whole before the rotation that closed them.
                (false, false) => wal::OnDamage::Refuse,
            };
            let end = wal::scan(&path, &data, wal::LOG_MAGIC, on_damage, |r| {
                if let record::Record::Write(w) = r {
                    apply(w)
                }
            })?;
            report.log_records += end.records;
            if let Some((offset, len, reason)) = &end.torn {
                let what = if config.repair {
                    "cut the log at the damage, as --repair-truncate asked"
                } else {
                    "cut off a damaged log tail that nothing after it says was synced (torn by \
                     a crash; acknowledged only under --sync interval or never)"
                };
                tracing::warn!(
                    file = %path.display(),
                    offset,
                    dropped_bytes = len,
                    reason = %reason,
                    "{what}"
                );
                report.torn_bytes += len;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(Error::io(format!("opening {}", path.display())))?;
                f.set_len(end.good_len)
                    .and_then(|()| f.sync_all())
                    .map_err(Error::io(format!("truncating {}", path.display())))?;
            }
            if last {
                let header = record::check_header(&data, wal::LOG_MAGIC)
                    .expect("the scan checked the header");
                tail = Some((g, end.good_len, header));
            }
        }

        let create = |g| {
            wal::create_log(dir, g)
                .map(|(file, nonce)| (g, file, record::GROUPED_HEADER_LEN as u64, nonce))
                .map_err(Error::io(format!("creating a log in {}", dir.display())))
        };
        let (generation, file, len, nonce) = match tail {
            Some((g, len, header)) if header.version == record::LOG_FORMAT_VERSION => {
                let path = wal::log_path(dir, g);
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(Error::io(format!("opening {}", path.display())))?;
                // The writer's groups say the file is synced up to where it starts: make it so.
                // After a process crash (not a power cut) the last appends may be only in the
                // page cache.
                file.sync_data()
                    .map_err(Error::io(format!("syncing {}", path.display())))?;
                (g, file, len, header.nonce)
            }
            // A log of an older format: it stays as it is (its torn tail, if any, was cut
            // above), and writing goes on in a new one, so that no file mixes the formats. It
            // is synced first: from now on it is an earlier log, whose damage is refused.
            Some((g, _, _)) => {
                let path = wal::log_path(dir, g);
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(Error::io(format!("syncing {}", path.display())))?;
                create(g + 1)?
            }
            None => create(base)?,
        };
        let opener_dir = dir.clone();
        let writer = wal::LogWriter::start(
            file,
            len,
            nonce,
            Box::new(move |g| wal::create_log(&opener_dir, g)),
            config.sync,
        );
        report.keys = map.len();
        Ok(Recovered {
            map,
            max_time,
            newest_by_node,
            storage: Storage {
                dir: dir.clone(),
                writer,
                generation,
                compact_after_bytes: config.compact_after_bytes,
                tombstone_grace: config.tombstone_grace,
                compacting: Arc::new(AtomicBool::new(false)),
                _lock: lock,
            },
            report,
        })
    }

    /// Logs `write`; compacts in the background when the log has grown past its limit.
    pub fn append(&mut self, write: &Write, map: &Arc<Map>) -> Durable {
        self.append_all([write], map)
    }

    /// Logs `writes` as one append, so that they share one group commit (one fsync) rather
    /// than wake the log thread once each and maybe straddle two of its groups.
    pub fn append_all<'a>(
        &mut self,
        writes: impl IntoIterator<Item = &'a Write>,
        map: &Arc<Map>,
    ) -> Durable {
        self.append_framed(writes, map, None)
    }

    /// [`Storage::append_all`] for a caller that also relies on earlier appends, having
    /// accounted for `failures` failed ones (see [`wal::LogWriter::append_after`]). With no
    /// writes it is a barrier.
    pub fn append_all_after<'a>(
        &mut self,
        writes: impl IntoIterator<Item = &'a Write>,
        map: &Arc<Map>,
        failures: u64,
    ) -> Durable {
        self.append_framed(writes, map, Some(failures))
    }

    /// How many appends have failed so far.
    pub fn failures(&self) -> u64 {
        self.writer.failures()
    }

    fn append_framed<'a>(
        &mut self,
        writes: impl IntoIterator<Item = &'a Write>,
        map: &Arc<Map>,
        relied_on: Option<u64>,
    ) -> Durable {
        let mut framed = Vec::new();
        for write in writes {
            record::encode_write(write, &mut framed);
        }
        let durable = match relied_on {
            Some(failures) => self.writer.append_after(framed, failures),
            None if framed.is_empty() => return Durable::ready(),
            None => self.writer.append(framed),
        };
        if self.writer.bytes() > self.compact_after_bytes
            && !self.compacting.swap(true, Ordering::AcqRel)
        {
            self.compact(map.clone());
        }
        durable
    }

    /// The key and version of every write whose append failed since the last call: in the
    /// map, perhaps, but not in the log.
    pub fn take_unlogged(&self) -> Vec<(String, Version)> {
        let mut unlogged = Vec::new();
        for framed in self.writer.take_failed() {
            let mut rest = &framed[..];
            // These are our own encodings, so they decode; stop at anything that does not.
            while let Ok((record, used)) = record::decode(rest) {
                if let record::Record::Write(w) = record {
                    unlogged.push((w.key, w.entry.version));
                }
                rest = &rest[used..];
            }
        }
        unlogged
    }

    /// Bytes in the current log.
    pub fn log_bytes(&self) -> u64 {
        self.writer.bytes()
    }

    /// How long tombstones are kept.
    pub fn tombstone_grace(&self) -> Duration {
        self.tombstone_grace
    }

    fn compact(&mut self, map: Arc<Map>) {
        let next = self.generation + 1;
        let rotated = self.writer.rotate(next);
        self.generation = next;
        let dir = self.dir.clone();
        let compacting = self.compacting.clone();
        let purge_before = crate::version::now_minus(self.tombstone_grace);
        std::thread::Builder::new()
            .name("kvstore-compact".into())
            .spawn(move || {
                match futures::executor::block_on(rotated.wait()) {
                    Ok(()) => match snapshot::write(&dir, next, &map, Some(purge_before)) {
                        Ok(stats) => {
                            remove_older_than(&dir, next);
                            tracing::info!(
                                generation = next,
                                entries = stats.entries,
                                bytes = stats.bytes,
                                purged_tombstones = stats.purged_tombstones,
                                "snapshot written, older log dropped"
                            );
                        }
                        Err(error) => tracing::error!(%error, "snapshot failed; keeping the logs"),
                    },
                    Err(error) => {
                        tracing::error!(%error, "log rotation failed; compaction skipped")
                    }
                }
                compacting.store(false, Ordering::Release);
            })
            .expect("spawning the compaction thread");
    }

    /// Stops the log writer once everything queued is written and synced.
    pub async fn close(self) {
        self.writer.close().await;
    }
}

/// Deletes logs and snapshots of generations below `generation`.
fn remove_older_than(dir: &Path, generation: u64) {
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let g = generation_of(&name, "log-", ".wal")
            .or_else(|| generation_of(&name, "snapshot-", ".snap"));
        if g.is_some_and(|g| g < generation) {
            let _ = std::fs::remove_file(item.path());
        }
    }
    let _ = wal::sync_dir(dir);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write as _;

    use super::*;

    /// Durable settings on `dir`, with no compaction.
    pub(crate) fn config(dir: &Path) -> StorageConfig {
        StorageConfig {
            dir: dir.to_path_buf(),
            sync: SyncMode::Always,
            compact_after_bytes: u64::MAX,
            repair: false,
            tombstone_grace: Duration::from_secs(3600),
        }
    }

    fn write(key: &str, value: Option<&str>, time: u64) -> Write {
        crate::store::testing::write(key, value, time, "n1")
    }

    /// Opens, appends `writes` (applying them to the map as the store would), closes.
    async fn append_all(config: &StorageConfig, writes: &[Write]) -> Recovered {
        let mut r = Storage::open(config).unwrap();
        let map = Arc::new(std::mem::take(&mut r.map));
        for w in writes {
            map.insert(w.key.as_str().into(), Slot::new(&w.entry));
            r.storage.append(w, &map).wait().await.unwrap();
        }
        let Recovered { storage, .. } = r;
        storage.close().await;
        Storage::open(config).unwrap()
    }

    fn value(r: &Recovered, key: &str) -> Option<Option<String>> {
        r.map.get(key).map(|e| e.value_str().map(String::from))
    }

    #[tokio::test]
    async fn writes_survive_a_restart_newest_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let r = append_all(
            &cfg,
            &[
                write("a", Some("1"), 10),
                write("b", Some("2"), 11),
                write("a", None, 12),
            ],
        )
        .await;
        assert_eq!(value(&r, "a"), Some(None), "the tombstone is recovered");
        assert_eq!(value(&r, "b"), Some(Some("2".into())));
        assert_eq!(r.max_time, 12);
        assert_eq!(r.report.log_records, 3);
    }

    #[tokio::test]
    async fn recovery_settles_two_writes_under_one_version_as_apply_does() {
        let (apple, banana) = (write("k", Some("apple"), 7), write("k", Some("banana"), 7));
        for order in [[&apple, &banana], [&banana, &apple]] {
            let dir = tempfile::tempdir().unwrap();
            let writes: Vec<Write> = order.into_iter().cloned().collect();
            let r = append_all(&config(dir.path()), &writes).await;
            assert_eq!(value(&r, "k"), Some(Some("banana".into())), "{order:?}");
        }
    }

    #[tokio::test]
    async fn a_batch_logged_as_one_append_is_recovered_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let batch = [
            write("a", Some("1"), 10),
            write("b", Some("2"), 11),
            write("a", Some("3"), 12),
        ];
        let mut r = Storage::open(&cfg).unwrap();
        let map = Arc::new(std::mem::take(&mut r.map));
        r.storage.append_all(&batch, &map).wait().await.unwrap();
        // Nothing to log is durable at once, without a record.
        r.storage.append_all([], &map).wait().await.unwrap();
        r.storage.close().await;
        let r = Storage::open(&cfg).unwrap();
        assert_eq!(r.report.log_records, 3);
        assert_eq!(value(&r, "a"), Some(Some("3".into())));
        assert_eq!(value(&r, "b"), Some(Some("2".into())));
    }

    #[tokio::test]
    async fn a_second_process_cannot_open_the_same_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Storage::open(&config(dir.path())).unwrap();
        let err = Storage::open(&config(dir.path())).err().unwrap();
        assert!(matches!(err, Error::Locked(_)), "{err}");
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        drop(append_all(&cfg, &[write("a", Some("1"), 1), write("b", Some("2"), 2)]).await);
        let log = wal::log_path(dir.path(), 0);
        let good = std::fs::metadata(&log).unwrap().len();
        // Half a record, as a crash mid-append leaves it.
        let mut half = Vec::new();
        record::encode_write(&write("c", Some("3"), 3), &mut half);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(&half[..half.len() / 2])
            .unwrap();
        let r = append_all(&cfg, &[write("d", Some("4"), 4)]).await;
        assert_eq!(value(&r, "c"), None);
        assert_eq!(
            value(&r, "d"),
            Some(Some("4".into())),
            "appends resume after the cut"
        );
        assert_eq!(r.report.torn_bytes, 0, "the second open found a clean log");
        assert!(std::fs::metadata(&log).unwrap().len() > good);
    }

    #[tokio::test]
    async fn a_log_of_bare_records_is_read_and_writing_goes_on_in_a_new_one() {
        // A data dir from a build before group frames: one log of format 1, torn at its end.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let old = wal::log_path(dir.path(), 0);
        let mut data = record::header(wal::LOG_MAGIC).to_vec();
        record::encode_write(&write("a", Some("1"), 1), &mut data);
        let good = data.len();
        record::encode_write(&write("b", Some("2"), 2), &mut data);
        data.truncate(data.len() - 3);
        std::fs::write(&old, &data).unwrap();

        let r = append_all(&cfg, &[write("c", Some("3"), 3)]).await;
        assert_eq!(value(&r, "a"), Some(Some("1".into())));
        assert_eq!(value(&r, "b"), None, "the torn record was cut");
        assert_eq!(value(&r, "c"), Some(Some("3".into())));
        assert_eq!(std::fs::metadata(&old).unwrap().len(), good as u64);
        let new = std::fs::read(wal::log_path(dir.path(), 1)).unwrap();
        let header = record::check_header(&new, wal::LOG_MAGIC).unwrap();
        assert_eq!(header.version, record::LOG_FORMAT_VERSION);
        drop(r);
        // And a third start reads both: the old log is no longer the newest, and is whole.
        let r = Storage::open(&cfg).unwrap();
        assert_eq!(r.map.len(), 2);
        assert_eq!(r.report.torn_bytes, 0);
    }

    #[tokio::test]
    async fn after_a_power_cut_under_interval_sync_the_unsynced_groups_are_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.sync = SyncMode::Interval(Duration::from_secs(3600));
        let writes: Vec<Write> = ["a", "b", "c", "d"]
            .iter()
            .zip(1..)
            .map(|(k, t)| write(k, Some("v"), t))
            .collect();
        let mut r = Storage::open(&cfg).unwrap();
        let map = Arc::new(std::mem::take(&mut r.map));
        for w in &writes {
            r.storage.append(w, &map).wait().await.unwrap();
        }
        // What the disk holds after the power cut: none of the four was synced (the interval
        // never came), and the page cache reached the disk for all but part of "b".
        let log = wal::log_path(dir.path(), 0);
        let mut on_disk = std::fs::read(&log).unwrap();
        r.storage.close().await;
        let mut one = Vec::new();
        record::encode_write(&writes[0], &mut one);
        let group = record::GROUP_HEADER_LEN + one.len();
        let second = record::GROUPED_HEADER_LEN + group;
        on_disk[second + 25..second + 30].fill(0);
        std::fs::write(&log, &on_disk).unwrap();

        // The node starts, with what precedes the tear; "c" and "d" were never synced either.
        let r = Storage::open(&cfg).unwrap();
        assert_eq!(r.map.len(), 1);
        assert_eq!(value(&r, "a"), Some(Some("v".into())));
        assert_eq!(r.report.torn_bytes, 3 * group as u64);
        drop(r);

        // A restart syncs the log before writing on, and groups written from then on say so:
        // damage to "a" is now damage to synced data.
        let r = append_all(&cfg, &[write("e", Some("v"), 5)]).await;
        assert_eq!(r.map.len(), 2);
        drop(r);
        refuses_damage_to_its_first_group(&cfg, &log);
    }

    /// Flips a byte inside the first group of `log` and checks that opening `cfg` refuses it,
    /// naming the group's offset.
    fn refuses_damage_to_its_first_group(cfg: &StorageConfig, log: &Path) {
        let mut data = std::fs::read(log).unwrap();
        data[record::GROUPED_HEADER_LEN + 25] ^= 0xFF;
        std::fs::write(log, &data).unwrap();
        let err = Storage::open(cfg).err().unwrap().to_string();
        assert!(
            err.contains(&format!("offset {}", record::GROUPED_HEADER_LEN)),
            "{:?}: {err}",
            cfg.sync
        );
    }

    #[tokio::test]
    async fn damage_to_groups_a_clean_close_synced_is_refused_in_every_sync_mode() {
        for sync in [
            SyncMode::Interval(Duration::from_secs(3600)),
            SyncMode::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path());
            cfg.sync = sync;
            let mut r = Storage::open(&cfg).unwrap();
            let map = Arc::new(std::mem::take(&mut r.map));
            for w in [write("a", Some("1"), 1), write("b", Some("2"), 2)] {
                r.storage.append(&w, &map).wait().await.unwrap();
            }
            // No group after "a" was written after a sync: only the close's own mark says
            // that "a" reached the disk.
            r.storage.close().await;
            refuses_damage_to_its_first_group(&cfg, &wal::log_path(dir.path(), 0));
        }
    }

    #[tokio::test]
    async fn a_log_of_groups_without_sync_marks_is_read_and_writing_goes_on_in_a_new_one() {
        // A data dir from a build whose groups did not say what was synced (format 2).
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let old = wal::log_path(dir.path(), 0);
        let nonce = 99;
        let mut data =
            record::grouped_header_of(record::GROUPED_FORMAT_VERSION, wal::LOG_MAGIC, nonce)
                .to_vec();
        let mut records = Vec::new();
        record::encode_write(&write("a", Some("1"), 1), &mut records);
        data.extend(record::v2_group_header(nonce, &records));
        data.extend(&records);
        std::fs::write(&old, &data).unwrap();

        let r = append_all(&cfg, &[write("b", Some("2"), 2)]).await;
        assert_eq!(value(&r, "a"), Some(Some("1".into())));
        assert_eq!(value(&r, "b"), Some(Some("2".into())));
        assert_eq!(
            std::fs::read(&old).unwrap(),
            data,
            "the old log is left as it was"
        );
        let new = std::fs::read(wal::log_path(dir.path(), 1)).unwrap();
        let header = record::check_header(&new, wal::LOG_MAGIC).unwrap();
        assert_eq!(header.version, record::LOG_FORMAT_VERSION);
    }

    #[tokio::test]
    async fn mid_log_damage_refuses_to_start_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let writes: Vec<Write> = (0..5)
            .map(|i| write(&format!("k{i}"), Some("v"), i))
            .collect();
        drop(append_all(&cfg, &writes).await);
        let log = wal::log_path(dir.path(), 0);
        let mut data = std::fs::read(&log).unwrap();
        let mut one = Vec::new();
        record::encode_write(&writes[0], &mut one);
        // One group per append (each waited for its sync).
        let second = record::GROUPED_HEADER_LEN + record::GROUP_HEADER_LEN + one.len();
        data[second + 12] ^= 0x55;
        std::fs::write(&log, &data).unwrap();

        let err = Storage::open(&cfg).err().unwrap().to_string();
        assert!(err.contains(&log.display().to_string()), "{err}");
        assert!(err.contains(&format!("offset {second}")), "{err}");
        assert!(err.contains("--repair-truncate"), "{err}");

        cfg.repair = true;
        let r = Storage::open(&cfg).unwrap();
        assert_eq!(r.map.len(), 1, "only what precedes the damage");
    }

    #[tokio::test]
    async fn compaction_snapshots_drops_old_logs_and_purges_old_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.compact_after_bytes = 2_000;
        cfg.tombstone_grace = Duration::from_secs(60);
        let recent = crate::version::now_minus(Duration::ZERO);
        let ancient = crate::version::now_minus(Duration::from_secs(3600));
        let mut writes = vec![
            write("old-delete", None, ancient),
            write("new-delete", None, recent),
        ];
        writes.extend((0..200).map(|i| write(&format!("k{i:03}"), Some("value"), recent + i)));
        let mut r = Storage::open(&cfg).unwrap();
        let map = Arc::new(std::mem::take(&mut r.map));
        for w in &writes {
            map.insert(w.key.as_str().into(), Slot::new(&w.entry));
            r.storage.append(w, &map).wait().await.unwrap();
        }
        // Compaction runs in the background: wait for it to settle.
        for _ in 0..500 {
            if !r.storage.compacting.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Recovered { storage, .. } = r;
        storage.close().await;

        let files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let logs = files.iter().filter(|f| f.ends_with(".wal")).count();
        let snaps = files.iter().filter(|f| f.ends_with(".snap")).count();
        assert!(snaps >= 1, "{files:?}");
        assert!(logs <= 2, "old logs are dropped: {files:?}");

        let r = Storage::open(&cfg).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let map = Map::new();
        map.insert("k".into(), Slot::new(&write("k", Some("v"), 1).entry));
        snapshot::write(dir.path(), 3, &map, None).unwrap();
        let path = snapshot::snapshot_path(dir.path(), 3);
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data.truncate(n - 5);
        std::fs::write(&path, &data).unwrap();
        let err = Storage::open(&config(dir.path()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("snapshot-0000000000000003.snap"), "{err}");
    }
}

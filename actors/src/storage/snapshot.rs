//! Snapshots: the whole map in one file, written in the background so the log can be dropped.
//!
//! A snapshot is written to a `.tmp` file, synced, then renamed into place, so a `.snap` file
//! is always complete; it also ends with a record counting its entries, which the reader
//! checks. It is taken *after* the log was rotated to a new generation, while writes go on:
//! it may already contain some writes that are also in the new log, which is harmless, because
//! replaying an entry that is not newer changes nothing.

use std::path::{Path, PathBuf};

use super::record::{self, Record};
use super::wal::{self, OnDamage};
use crate::error::Error;
use crate::store::{Map, Write};

/// Magic at the start of every snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSTSNP\n";

/// The path of generation `g`'s snapshot in `dir`.
pub fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot-{generation:016}.snap"))
}

/// What a snapshot held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub entries: u64,
    pub purged_tombstones: u64,
    pub bytes: u64,
}

/// A snapshot encoded in memory, not yet written.
pub struct Encoded {
    /// The whole file: header, records, end record.
    pub bytes: Vec<u8>,
    /// Entries in it.
    pub entries: u64,
    /// Keys of tombstones past the grace period, left out.
    pub expired: Vec<Box<str>>,
}

/// Encodes every entry of `map` into a snapshot file's bytes, leaving out tombstones whose
/// version time is below `purge_before`. This is the part that holds the map's shard locks
/// (one shard at a time, for reading), so writers to a shard wait while it is encoded: it
/// must stay cheap per entry. `cargo bench -p kvstore-actors -- snapshot` measures it.
pub fn encode(map: &Map, purge_before: Option<u64>) -> Encoded {
    let mut bytes = record::header(SNAPSHOT_MAGIC).to_vec();
    let mut entries = 0;
    let mut expired = Vec::new();
    for item in map.iter() {
        if item.value().is_expired(purge_before) {
            expired.push(item.key().clone());
            continue;
        }
        let slot = item.value();
        record::encode(item.key(), slot.version(), slot.value_str(), &mut bytes);
        entries += 1;
    }
    record::encode_end(entries, &mut bytes);
    Encoded {
        bytes,
        entries,
        expired,
    }
}

/// Writes generation `generation`'s snapshot of `map`. Tombstones whose version time is below
/// `purge_before` are left out and then removed from the map: they are past the grace period.
pub fn write(
    dir: &Path,
    generation: u64,
    map: &Map,
    purge_before: Option<u64>,
) -> Result<SnapshotStats, Error> {
    // Encode in memory, then write with no map lock held: writers never wait on the disk.
    let encoded = encode(map, purge_before);
    let mut stats = SnapshotStats {
        entries: encoded.entries,
        purged_tombstones: 0,
        bytes: encoded.bytes.len() as u64,
    };

    let tmp = dir.join(format!("snapshot-{generation:016}.tmp"));
    std::fs::write(&tmp, &encoded.bytes)
        .map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(format!("syncing {}", tmp.display())))?;
    let path = snapshot_path(dir, generation);
    std::fs::rename(&tmp, &path).map_err(Error::io(format!("renaming to {}", path.display())))?;
    wal::sync_dir(dir).map_err(Error::io(format!("syncing {}", dir.display())))?;

    for key in encoded.expired {
        // Only if it is still that old tombstone: a write that landed meanwhile stays.
        if map
            .remove_if(&key, |_, e| e.is_expired(purge_before))
            .is_some()
        {
            stats.purged_tombstones += 1;
        }
    }
    Ok(stats)
}

/// Reads a snapshot, handing every write to `f`. Returns the number of entries.
pub fn read(path: &Path, repair: bool, mut f: impl FnMut(Write)) -> Result<u64, Error> {
    let data = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let mut end = None;
    let on_damage = if repair {
        OnDamage::Truncate
    } else {
        OnDamage::Refuse
    };
    let scanned = wal::scan(path, &data, SNAPSHOT_MAGIC, on_damage, |r| match r {
        Record::Write(w) => f(w),
        Record::End(n) => end = Some(n),
    })?;
    match end {
        Some(n) if n + 1 == scanned.records => Ok(n),
        _ if repair => Ok(scanned.records),
        Some(n) => Err(Error::Corrupt {
            file: path.to_path_buf(),
            offset: scanned.good_len,
            reason: format!(
                "end record counts {n} entries but {} precede it",
                scanned.records - 1
            ),
        }),
        None => Err(Error::Corrupt {
            file: path.to_path_buf(),
            offset: scanned.good_len,
            reason: "snapshot has no end record (incomplete)".into(),
        }),
    }
}

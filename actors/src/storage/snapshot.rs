//! Snapshots: the whole map in one file, written in the background so the logs before it can
//! be dropped.
//!
//! A snapshot is written to a `.tmp` file, synced, then renamed into place, so a `.snap` file
//! is always complete; it also ends with a record counting its entries, which the reader
//! checks. It is taken *after* the log was rotated to a new generation, while writes go on:
//! it may already contain some writes that are also in the new log, which is harmless, because
//! replaying an entry that is not newer changes nothing.

use std::io::Read;

use super::fs::DataDir;
use super::record::{self, RecordRef, WriteRef};
use super::scan::scan_snapshot;
use crate::entry::Map;
use crate::error::Error;

/// The file name of generation `g`'s snapshot.
pub fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:016}.snap")
}

/// A snapshot encoded in memory, not yet written.
pub struct Encoded {
    /// The whole file: header, records, end record.
    pub bytes: Vec<u8>,
    /// Entries in it.
    pub entries: u64,
    /// Keys of tombstones past the grace period, left out: the store may purge them.
    pub expired: Vec<Box<str>>,
}

/// Encodes every entry of `map` into a snapshot file's bytes, leaving out tombstones whose
/// version time is below `purge_before`. This is the part that holds the map's shard locks
/// (one shard at a time, for reading), so writers to a shard wait while it is encoded: it
/// must stay cheap per entry. `cargo bench -p kvstore-actors -- snapshot` measures it.
pub fn encode(map: &Map, purge_before: Option<u64>) -> Encoded {
    let mut bytes = record::snapshot_header().to_vec();
    let mut entries = 0;
    let mut expired = Vec::new();
    for item in map.iter() {
        if item.is_expired(purge_before) {
            expired.push(Box::from(item.key()));
            continue;
        }
        record::encode(item.key(), item.version(), item.value_str(), &mut bytes);
        entries += 1;
    }
    record::encode_end(entries, &mut bytes);
    record::set_snapshot_entries(&mut bytes, entries);
    Encoded {
        bytes,
        entries,
        expired,
    }
}

/// Writes `encoded` as generation `generation`'s snapshot in `dir`, with no map lock held:
/// writers never wait on the disk. On failure nothing is left behind: a `.tmp` file that could
/// not be finished is removed at once, not at the next start (on a full disk it would hold on
/// to the very space that ran out).
pub fn write(dir: &dyn DataDir, generation: u64, encoded: &Encoded) -> Result<(), Error> {
    let name = snapshot_name(generation);
    let tmp = format!("{name}.tmp");
    let context = |what: &str| format!("{what} {}", dir.path().join(&tmp).display());
    let written = (|| {
        let mut file = dir.create(&tmp).map_err(Error::io(context("creating")))?;
        file.append(&encoded.bytes)
            .map_err(Error::io(context("writing")))?;
        file.sync().map_err(Error::io(context("syncing")))
    })();
    if let Err(error) = written {
        let _ = dir.remove(&tmp);
        return Err(error);
    }
    if let Err(error) = dir.rename(&tmp, &name) {
        let _ = dir.remove(&tmp);
        return Err(Error::io(context("renaming"))(error));
    }
    // Complete and synced under its own name: if only the directory sync fails, the file is
    // good, and the logs it covers stay until a later snapshot's sync succeeds.
    dir.sync()
        .map_err(Error::io(format!("syncing {}", dir.path().display())))
}

/// How many entries snapshot `name`'s header says it holds; 0 if it cannot say. Read before
/// the snapshot itself, whose reading reports any damage. The header has no checksum of its
/// own, so the count is capped by what the file's length could hold: a damaged one must not
/// size the map past the machine's memory.
pub fn entries_hint(dir: &dyn DataDir, name: &str) -> usize {
    // The length first: a file that says it holds nothing (a pipe, say) is not opened, since
    // what this read takes from it the snapshot's own reading would miss.
    let smallest = record::FRAME_LEN + record::MIN_PAYLOAD;
    let room = match dir.len(name) {
        Ok(len) => usize::try_from(len).unwrap_or(usize::MAX) / smallest,
        Err(_) => 0,
    };
    if room == 0 {
        return 0;
    }
    let mut header = [0u8; record::SNAPSHOT_HEADER_LEN];
    let read = (dir.open_read(name)).and_then(|mut f| f.read_exact(&mut header));
    if read.is_err() || record::check_snapshot_header(&header).is_err() {
        return 0;
    }
    record::snapshot_entries(&header).min(room)
}

/// Reads snapshot `name` of `dir`, handing every write to `f`. Returns the number of entries.
pub fn read(
    dir: &dyn DataDir,
    name: &str,
    repair: bool,
    mut f: impl FnMut(WriteRef<'_>),
) -> Result<u64, Error> {
    let path = dir.path().join(name);
    let input = dir
        .open_read(name)
        .map_err(Error::io(format!("reading {}", path.display())))?;
    let mut end = None;
    let scanned = scan_snapshot(&path, input, repair, |r| match r {
        RecordRef::Write(w) => f(w),
        RecordRef::End(n) => end = Some(n),
    })?;
    match end {
        Some(n) if n + 1 == scanned.records => Ok(n),
        _ if repair => Ok(scanned.records - u64::from(end.is_some())),
        Some(n) => Err(Error::Corrupt {
            file: path,
            offset: scanned.good_len,
            reason: format!(
                "end record counts {n} entries but {} precede it",
                scanned.records - 1
            ),
        }),
        None => Err(Error::Corrupt {
            file: path,
            offset: scanned.good_len,
            reason: "snapshot has no end record (incomplete)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fs::crash::{CrashDir, Tear};
    use super::*;
    use crate::entry::Slot;
    use crate::testing::write as w;

    fn map_of(keys: &[&str]) -> Map {
        let map = crate::entry::new_map();
        for (t, k) in (1..).zip(keys) {
            map.put(Slot::new(k, &w(k, Some("v"), t, "n1").entry));
        }
        map
    }

    #[test]
    fn a_snapshot_reads_back_what_was_encoded() {
        let dir = CrashDir::default();
        let map = map_of(&["a", "b", "c"]);
        map.put(Slot::new("gone", &w("gone", None, 5, "n1").entry));
        let encoded = encode(&map, Some(6));
        assert_eq!(
            (encoded.entries, &encoded.expired[..]),
            (3, &["gone".into()][..])
        );
        write(&dir, 4, &encoded).unwrap();
        dir.crash(Tear::Nothing);
        let mut keys = Vec::new();
        let n = read(&dir, &snapshot_name(4), false, |w| {
            keys.push(w.key.to_string())
        })
        .unwrap();
        keys.sort();
        assert_eq!((n, keys), (3, vec!["a".into(), "b".into(), "c".into()]));
        // The header says how many entries follow (the expired tombstone left out).
        assert_eq!(entries_hint(&dir, &snapshot_name(4)), 3);
    }

    #[test]
    fn a_header_that_says_no_count_or_no_header_gives_no_hint() {
        let dir = CrashDir::default();
        let mut encoded = encode(&map_of(&["a", "b"]), None);
        // As an older build wrote it: the count's bytes left zero.
        record::set_snapshot_entries(&mut encoded.bytes, 0);
        write(&dir, 1, &encoded).unwrap();
        assert_eq!(entries_hint(&dir, &snapshot_name(1)), 0);
        // It still reads back whole: the hint is no part of the check.
        assert_eq!(read(&dir, &snapshot_name(1), false, |_| {}).unwrap(), 2);
        assert_eq!(entries_hint(&dir, &snapshot_name(2)), 0, "no such file");
        let mut garbage = encode(&map_of(&["a"]), None);
        garbage.bytes[0] ^= 0xff;
        write(&dir, 3, &garbage).unwrap();
        assert_eq!(entries_hint(&dir, &snapshot_name(3)), 0, "not a snapshot");
        // A damaged count is held to what the file could hold.
        let mut damaged = encode(&map_of(&["a"]), None);
        record::set_snapshot_entries(&mut damaged.bytes, u64::from(u32::MAX));
        write(&dir, 4, &damaged).unwrap();
        let room = damaged.bytes.len() / (record::FRAME_LEN + record::MIN_PAYLOAD);
        assert_eq!(entries_hint(&dir, &snapshot_name(4)), room);
        assert!(room < 10, "{room}");
    }

    #[test]
    fn a_snapshot_that_fails_leaves_no_tmp_file() {
        let dir = CrashDir::default();
        let encoded = encode(&map_of(&["a", "b"]), None);
        // Full at the first write: the creation worked, the bytes did not fit.
        dir.set_full(true);
        let err = write(&dir, 1, &encoded).unwrap_err().to_string();
        assert!(err.contains("snapshot-0000000000000001.snap.tmp"), "{err}");
        assert_eq!(dir.names(), Vec::<String>::new());
        dir.set_full(false);
        // Each step failing in turn: no step leaves a .tmp behind.
        for ops in 0..4 {
            dir.fail_after(ops);
            assert!(write(&dir, 1, &encoded).is_err(), "failing at step {ops}");
            let names = dir.names();
            assert!(
                names.iter().all(|n| !n.ends_with(".tmp")),
                "step {ops}: {names:?}"
            );
        }
    }

    #[test]
    fn a_snapshot_without_its_end_is_refused() {
        let dir = CrashDir::default();
        let encoded = encode(&map_of(&["k"]), None);
        write(&dir, 3, &encoded).unwrap();
        let name = snapshot_name(3);
        let mut data = dir.contents(&name).unwrap();
        let n = data.len();
        data.truncate(n - 5);
        dir.set_contents(&name, data);
        let err = read(&dir, &name, false, |_| ()).unwrap_err().to_string();
        assert!(err.contains(&name), "{err}");
        // Repaired, what precedes the damage is kept.
        assert_eq!(read(&dir, &name, true, |_| ()).unwrap(), 1);
    }
}

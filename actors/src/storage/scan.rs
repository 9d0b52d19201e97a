//! Reading a log or a snapshot back, record by record, and telling a torn tail from damage.
//!
//! A crash in the middle of an append leaves a torn tail: the last group half written, or, with
//! `--sync interval` or `never`, several unsynced groups in any state after a power cut (pages
//! reach the disk in any order). A torn tail was never acknowledged as synced, and is cut off.
//! Damage to bytes that were synced is something else, a failing disk or a stray write, and the
//! node refuses to start on it rather than drop acknowledged data without a word.
//!
//! The sync marks of the log's groups tell the two apart: a group says how much of the file was
//! synced when it was written. Damage that a later valid group vouches for (its mark is past
//! the damage) hit synced data: refused. Damage that nothing after it vouches for is a tear:
//! cut off, with everything after it. A snapshot is synced whole before it is renamed into
//! place, so any damage in one is damage.

use std::path::Path;

use super::record::{self, FrameError, Record, RecordRef};
use crate::entry::Write;
use crate::error::Error;

/// How a scan ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanEnd {
    /// Records read.
    pub records: u64,
    /// Bytes of good data (header included): where appending may resume.
    pub good_len: u64,
    /// The torn tail that was cut off, if any.
    pub torn: Option<Torn>,
}

/// A tail cut off by a scan.
#[derive(Debug, PartialEq, Eq)]
pub struct Torn {
    pub offset: u64,
    pub len: u64,
    /// What was wrong there, and why it counts as torn.
    pub reason: String,
}

/// What to do with damage found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDamage {
    /// Damage that no later group says was synced is a torn tail: cut it off. Damage to
    /// synced data is refused. (The newest log of a node.)
    TornTailOnly,
    /// Refuse any damage (a file that was synced whole before it was last closed).
    Refuse,
    /// The operator's repair: cut the file at the first damage, whatever follows.
    Truncate,
}

fn corrupt(path: &Path, offset: usize, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        file: path.to_path_buf(),
        offset: offset as u64,
        reason: reason.into(),
    }
}

/// Reads every write of `data`, a whole log file, handing each to `f`. A group is read whole
/// or not at all: nothing of a damaged group reaches `f`.
pub fn scan_log(
    path: &Path,
    data: &[u8],
    on_damage: OnDamage,
    mut f: impl FnMut(Write),
) -> Result<ScanEnd, Error> {
    let nonce = record::check_log_header(data).map_err(|reason| corrupt(path, 0, reason))?;
    let mut offset = record::LOG_HEADER_LEN;
    let mut records = 0;
    while offset < data.len() {
        let damage = match record::decode_group(&data[offset..], nonce) {
            Ok(group) => match group_writes(group.records) {
                Ok(writes) => {
                    records += writes.len() as u64;
                    writes.into_iter().for_each(&mut f);
                    offset += group.used;
                    continue;
                }
                // The group's checksum matches, so it was written whole and as it is: not a
                // tear (a record kind from a newer build, say). Only the operator's cut goes on.
                Err(why) if on_damage != OnDamage::Truncate => {
                    let at = offset + record::GROUP_HEADER_LEN + why.0;
                    return Err(corrupt(
                        path,
                        offset,
                        format!("{}, at byte {at} of a group whose checksum matches", why.1),
                    ));
                }
                Err(why) => why.1,
            },
            Err(error) => error,
        };
        return damaged(path, data, offset, &damage, nonce, on_damage, records);
    }
    Ok(ScanEnd {
        records,
        good_len: offset as u64,
        torn: None,
    })
}

/// The writes of a group's records, or where (an offset in them) and why one does not read.
fn group_writes(mut bytes: &[u8]) -> Result<Vec<Write>, (usize, FrameError)> {
    let total = bytes.len();
    let mut writes = Vec::new();
    while !bytes.is_empty() {
        let at = total - bytes.len();
        match record::decode(bytes) {
            Ok((Record::Write(w), used)) => {
                writes.push(w);
                bytes = &bytes[used..];
            }
            Ok((Record::End(_), _)) => {
                return Err((at, FrameError::BadPayload("a snapshot's end record".into())));
            }
            Err(e) => return Err((at, e)),
        }
    }
    Ok(writes)
}

/// The end of a log scan that found damage at `offset`: a torn tail (cut off), the operator's
/// cut, or the refusal.
fn damaged(
    path: &Path,
    data: &[u8],
    offset: usize,
    error: &FrameError,
    nonce: u32,
    on_damage: OnDamage,
    records: u64,
) -> Result<ScanEnd, Error> {
    let after = offset + 1;
    let good_after =
        (after..data.len()).find(|&at| record::decode_group(&data[at..], nonce).is_ok());
    let vouched = good_after.map(|at| highest_sync_mark(&data[at..], nonce));
    let reason = match (good_after, vouched) {
        (Some(at), Some(synced)) if synced <= offset as u64 => format!(
            "{error}; the valid groups after it (from offset {at}) were written when only \
             {synced} bytes were synced, so it was never synced, and neither were they"
        ),
        (Some(at), Some(synced)) => format!(
            "{error}; a valid group follows at offset {at}, and says the file was synced up \
             to byte {synced}"
        ),
        _ if *error == FrameError::Truncated => error.to_string(),
        _ => format!("{error}, and nothing valid after it"),
    };
    let torn = vouched.is_none_or(|synced| synced <= offset as u64);
    match on_damage {
        OnDamage::Truncate => {}
        OnDamage::TornTailOnly if torn => {}
        _ => return Err(corrupt(path, offset, reason)),
    }
    Ok(ScanEnd {
        records,
        good_len: offset as u64,
        torn: Some(Torn {
            offset: offset as u64,
            len: (data.len() - offset) as u64,
            reason,
        }),
    })
}

/// The highest sync mark among the groups in `data` (which starts with one), skipping damage
/// between them. Marks only grow through a file, but the groups after the first may be damaged
/// too, so every one is read.
fn highest_sync_mark(data: &[u8], nonce: u32) -> u64 {
    let mut highest = 0;
    let mut at = 0;
    while at < data.len() {
        match record::decode_group(&data[at..], nonce) {
            Ok(group) => {
                highest = highest.max(group.synced);
                at += group.used;
            }
            Err(_) => at += 1,
        }
    }
    highest
}

/// Bytes a snapshot is read in at a time. The file is read through a buffer of this size,
/// reused, rather than whole: a snapshot of a million keys is over 100 MiB, and every fresh page
/// a whole-file read touches costs the kernel a fault and a zeroing (a quarter of a restart's
/// time, profiled at 1M keys).
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A window onto a file being read front to back, refilled as records are taken from it.
struct Window<R> {
    input: R,
    buf: Vec<u8>,
    /// `buf[start..end]` holds bytes read and not yet taken.
    start: usize,
    end: usize,
    /// File offset of `buf[0]`.
    base: u64,
    eof: bool,
}

impl<R: std::io::Read> Window<R> {
    fn new(input: R) -> Self {
        Self {
            input,
            buf: vec![0; SNAPSHOT_CHUNK],
            start: 0,
            end: 0,
            base: 0,
            eof: false,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// File offset of [`Self::bytes`].
    fn offset(&self) -> u64 {
        self.base + self.start as u64
    }

    fn take(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads more after what is left; grows the buffer when what is left fills it (a record
    /// larger than a chunk). Returns false at the end of the file.
    fn refill(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.base += self.start as u64;
        self.end -= self.start;
        self.start = 0;
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        } else if self.buf.len() > SNAPSHOT_CHUNK && self.end < SNAPSHOT_CHUNK {
            // Past the big record that grew it: back to a chunk, so the rest of the file is
            // not read (and handed on) in pieces that large.
            self.buf.truncate(SNAPSHOT_CHUNK);
            self.buf.shrink_to_fit();
        }
        let before = self.end;
        while self.end < self.buf.len() {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.end > before)
    }

    /// Bytes from [`Self::offset`] to the end of the file.
    fn rest_len(&mut self) -> std::io::Result<u64> {
        let unread = std::io::copy(&mut self.input, &mut std::io::sink())?;
        Ok((self.end - self.start) as u64 + unread)
    }
}

/// Reads every record of a snapshot file from `input`, front to back, handing each to `f`.
/// Any damage is refused, unless the operator asked to cut there (`repair`).
///
/// Two threads share the work: one reads the file and checks each record (checksum, lengths,
/// UTF-8), the caller's applies them. Checksums were a fifth of a restart's time at 1M keys,
/// and a restart has the machine's cores to itself.
pub fn scan_snapshot(
    path: &Path,
    input: impl std::io::Read + Send,
    repair: bool,
    mut f: impl FnMut(RecordRef<'_>),
) -> Result<ScanEnd, Error> {
    std::thread::scope(|scope| {
        // Two windows' worth in flight: the reader keeps ahead without running far ahead.
        let (checked_tx, checked) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (spent, spent_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let reader = std::thread::Builder::new()
            .name("snapshot-reader".into())
            .spawn_scoped(scope, move || {
                check_snapshot(path, input, repair, |records| {
                    // A buffer grown for a big record is let go rather than kept in turn.
                    let spent = spent_rx.try_recv().ok();
                    let spent = spent.filter(|c| c.capacity() <= 2 * SNAPSHOT_CHUNK);
                    let mut chunk = spent.unwrap_or_default();
                    chunk.clear();
                    chunk.extend_from_slice(records);
                    // The applier is gone only if it panicked; the scope reports that.
                    checked_tx.send(chunk).is_ok()
                })
            })
            .map_err(|e| Error::io(format!("reading {}", path.display()))(e))?;
        for chunk in checked {
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let (record, used) = record::decode_checked(rest);
                f(record);
                rest = &rest[used..];
            }
            let _ = spent.send(chunk);
        }
        reader.join().expect("the snapshot reader does not panic")
    })
}

/// The reader's half of [`scan_snapshot`]: reads `input` through a [`Window`], checks every
/// record, and hands each run of good records to `checked` (which returns false to stop).
fn check_snapshot(
    path: &Path,
    input: impl std::io::Read,
    repair: bool,
    mut checked: impl FnMut(&[u8]) -> bool,
) -> Result<ScanEnd, Error> {
    let io = |e: std::io::Error| Error::io(format!("reading {}", path.display()))(e);
    let mut window = Window::new(input);
    window.refill().map_err(io)?;
    let header =
        record::check_snapshot_header(window.bytes()).map_err(|reason| corrupt(path, 0, reason))?;
    window.take(header);
    let mut records = 0;
    loop {
        // Every whole record the window holds, up to the first that does not read.
        let mut good = 0;
        let mut failure = None;
        while good < window.bytes().len() {
            match record::decode_ref(&window.bytes()[good..]) {
                Ok((_, used)) => {
                    good += used;
                    records += 1;
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        if good > 0 && !checked(&window.bytes()[..good]) {
            return Ok(ScanEnd::default());
        }
        window.take(good);
        match failure {
            None if window.refill().map_err(io)? => {}
            None => break,
            Some(FrameError::Truncated) if window.refill().map_err(io)? => {}
            Some(error) if repair => {
                let offset = window.offset();
                return Ok(ScanEnd {
                    records,
                    good_len: offset,
                    torn: Some(Torn {
                        offset,
                        len: window.rest_len().map_err(io)?,
                        reason: error.to_string(),
                    }),
                });
            }
            Some(error) => {
                return Err(corrupt(path, window.offset() as usize, error.to_string()));
            }
        }
    }
    Ok(ScanEnd {
        records,
        good_len: window.offset(),
        torn: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::{LOG_HEADER_LEN, group_header, log_header};
    use crate::storage::writer::tests::framed;

    const NONCE: u32 = 0x5eed;

    /// A log holding one group per entry of `groups`, as the writer makes it with fsync before
    /// every ack: each group says everything before it was synced.
    fn grouped_log_of(groups: &[&[&str]]) -> Vec<u8> {
        marked_log_of(groups, |start| start)
    }

    /// A log holding one group per entry of `groups`, the one starting at byte `start` saying
    /// that `mark(start)` bytes were synced.
    fn marked_log_of(groups: &[&[&str]], mark: impl Fn(u64) -> u64) -> Vec<u8> {
        let mut data = log_header(NONCE).to_vec();
        for keys in groups {
            let records: Vec<u8> = keys.iter().flat_map(|k| framed(k)).collect();
            data.extend(group_header(NONCE, mark(data.len() as u64), &records));
            data.extend(records);
        }
        data
    }

    fn keys_of(data: &[u8], on_damage: OnDamage) -> Result<(Vec<String>, ScanEnd), Error> {
        let mut keys = Vec::new();
        let end = scan_log(Path::new("log"), data, on_damage, |w| keys.push(w.key))?;
        Ok((keys, end))
    }

    #[test]
    fn a_torn_last_group_is_cut_off_whatever_survived_of_it() {
        let good = grouped_log_of(&[&["a"], &["b"]]);
        let last: Vec<&str> = vec!["c"; 200];
        let whole = grouped_log_of(&[&["a"], &["b"], &last]);
        // Its pages reached the disk out of order: one in the middle is zeros, and the records
        // after it are intact, but they are inside the torn group.
        let mut torn = whole.clone();
        torn[good.len() + 2000..good.len() + 2000 + 512].fill(0);
        let (keys, end) = keys_of(&torn, OnDamage::TornTailOnly).unwrap();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(end.good_len, good.len() as u64);
        assert_eq!(end.torn.unwrap().offset, good.len() as u64);
        // Its header did not make it, or only its first part did.
        for cut in [good.len() + 6, good.len() + 100, whole.len() - 1] {
            let (keys, end) = keys_of(&whole[..cut], OnDamage::TornTailOnly).unwrap();
            assert_eq!(
                (keys.len(), end.good_len),
                (2, good.len() as u64),
                "cut at {cut}"
            );
        }
        // A file that must be whole refuses even a torn tail; the operator's repair cuts it.
        assert!(keys_of(&whole[..whole.len() - 1], OnDamage::Refuse).is_err());
        let (keys, _) = keys_of(&whole[..whole.len() - 1], OnDamage::Truncate).unwrap();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn log_bytes_inside_a_torn_group_cannot_pass_for_data_after_damage() {
        // What a client's value could hold: a whole record, and a group frame salted with a
        // nonce it guessed. The append carrying it is torn after them.
        let mut inside = vec![b'x'; 20];
        inside.extend(framed("inner"));
        inside.extend(group_header(NONCE + 1, 0, &framed("inner")));
        inside.extend(framed("inner"));
        inside.extend([b'x'; 20]);
        let good = grouped_log_of(&[&["a"]]);
        let mut data = good.clone();
        data.extend(group_header(NONCE, good.len() as u64, &inside));
        data.extend(&inside[..inside.len() - 10]);
        let (keys, end) = keys_of(&data, OnDamage::TornTailOnly).unwrap();
        assert_eq!((keys, end.good_len), (vec!["a".into()], good.len() as u64));
    }

    #[test]
    fn a_whole_group_that_does_not_read_is_refused_even_at_the_end() {
        // Its checksum matches, so it was written whole: not a tear, though nothing follows.
        let good = grouped_log_of(&[&["a"]]);
        let mut data = good.clone();
        let unreadable = [framed("b"), vec![0xEE; 30]].concat();
        data.extend(group_header(NONCE, good.len() as u64, &unreadable));
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
        let torn = end.torn.unwrap();
        assert_eq!(
            (torn.offset, torn.len),
            (third as u64, (data.len() - third) as u64)
        );
        assert!(torn.reason.contains("never synced"), "{}", torn.reason);

        // The same damage to "a", which "b" and everything after say was synced: refused.
        let mut data = whole.clone();
        let first = LOG_HEADER_LEN;
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
        let synced_by_d = third + grouped_log_of(&[&["c"]]).len() - LOG_HEADER_LEN;
        assert!(
            err.contains(&format!("synced up to byte {synced_by_d}")),
            "{err}"
        );
    }

    fn snapshot_of(keys: &[&str]) -> Vec<u8> {
        let mut data = record::snapshot_header().to_vec();
        for k in keys {
            data.extend(framed(k));
        }
        record::encode_end(keys.len() as u64, &mut data);
        data
    }

    #[test]
    fn any_damage_to_a_snapshot_is_refused_with_file_and_offset_unless_repaired() {
        let mut data = snapshot_of(&["a", "b", "c"]);
        let second = record::SNAPSHOT_HEADER_LEN + framed("a").len();
        data[second + 10] ^= 0xFF;
        let err = scan_snapshot(Path::new("/data/snapshot-1.snap"), &data[..], false, |_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/data/snapshot-1.snap") && err.contains(&format!("offset {second}")),
            "{err}"
        );
        // The operator's repair cuts there instead.
        let mut n = 0;
        let end = scan_snapshot(Path::new("x"), &data[..], true, |_| n += 1).unwrap();
        assert_eq!((n, end.good_len), (1, second as u64));
        // Even a tail cut short is refused: a snapshot is synced whole before it has its name.
        let whole = snapshot_of(&["a"]);
        assert!(scan_snapshot(Path::new("x"), &whole[..whole.len() - 1], false, |_| ()).is_err());
        let mut records = 0;
        let end = scan_snapshot(Path::new("x"), &whole[..], false, |_| records += 1).unwrap();
        assert_eq!(
            (records, end.torn),
            (2, None),
            "the write and the end record"
        );
    }

    /// A file being read the ways a real one may be: at most `max` bytes per read (a pipe or
    /// a slow disk), interrupted before every other read when `interrupt` (a signal), and
    /// failing once its data is used up when `fail_at_end` (a disk error).
    #[derive(Default)]
    struct Reading<'a> {
        data: &'a [u8],
        max: usize,
        interrupt: bool,
        fail_at_end: bool,
        calls: usize,
    }

    impl<'a> Reading<'a> {
        fn of(data: &'a [u8], max: usize) -> Self {
            Self {
                data,
                max,
                ..Self::default()
            }
        }
    }

    impl std::io::Read for Reading<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.interrupt && self.calls % 2 == 1 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            if self.fail_at_end && self.data.is_empty() {
                return Err(std::io::Error::other("the disk said no"));
            }
            let n = buf.len().min(self.max).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// `n` framed writes of small values, the one at `big` three read windows long: the
    /// bytes, each write's offset in them and its length. Write `i` is of key `k{i}`.
    fn writes_with_a_big_one(n: u64, big: u64) -> (Vec<u8>, Vec<usize>, Vec<usize>) {
        let big_value = "b".repeat(3 * SNAPSHOT_CHUNK);
        let (mut data, mut offsets, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let value = if i == big {
                big_value.clone()
            } else {
                format!("v{i}")
            };
            let w = crate::testing::write(&format!("k{i}"), Some(&value), i + 1, "n1");
            offsets.push(data.len());
            record::encode_write(&w, &mut data);
            lens.push(data.len() - offsets[offsets.len() - 1]);
        }
        (data, offsets, lens)
    }

    #[test]
    fn a_snapshot_larger_than_its_read_window_reads_whole_with_damage_placed_exactly() {
        // Records straddle every window edge, and one is three windows long by itself.
        let (writes, offsets, _) = writes_with_a_big_one(40_000, 20_000);
        let header = record::snapshot_header();
        let mut data = header.to_vec();
        data.extend(&writes);
        record::encode_end(offsets.len() as u64, &mut data);
        let offsets: Vec<usize> = offsets.iter().map(|o| o + header.len()).collect();
        let keys: Vec<String> = (0..offsets.len()).map(|i| format!("k{i}")).collect();
        for max in [usize::MAX, 4093] {
            let mut seen = Vec::new();
            let end = scan_snapshot(Path::new("s"), Reading::of(&data, max), false, |r| {
                if let RecordRef::Write(w) = r {
                    assert_eq!(
                        w.value.map(str::len),
                        Some(if w.key == "k20000" {
                            3 * SNAPSHOT_CHUNK
                        } else {
                            w.key.len()
                        })
                    );
                    seen.push(w.key.to_string());
                }
            })
            .unwrap();
            assert_eq!(seen, keys, "reads of at most {max} bytes");
            assert_eq!(
                (end.records, end.good_len),
                (keys.len() as u64 + 1, data.len() as u64)
            );
        }
        // Damage far past the first window is placed at its record, and a repair cuts there.
        let at = offsets[30_000];
        let mut damaged = data.clone();
        damaged[at + 12] ^= 0xFF;
        let err = scan_snapshot(Path::new("s"), &damaged[..], false, |_| ()).unwrap_err();
        assert!(err.to_string().contains(&format!("offset {at}")), "{err}");
        let end = scan_snapshot(Path::new("s"), &damaged[..], true, |_| ()).unwrap();
        assert_eq!((end.records, end.good_len), (30_000, at as u64));
        let torn = end.torn.unwrap();
        assert_eq!(
            (torn.offset, torn.len),
            (at as u64, (data.len() - at) as u64)
        );
        // Damage before the big record, read in small pieces: the torn length counts what
        // was never read into the window too.
        let at = offsets[5_000];
        let mut damaged = data.clone();
        damaged[at + 12] ^= 0xFF;
        let end = scan_snapshot(Path::new("s"), Reading::of(&damaged, 4093), true, |_| ());
        let torn = end.unwrap().torn.unwrap();
        assert_eq!(
            (torn.offset, torn.len),
            (at as u64, (data.len() - at) as u64)
        );
        // A file cut inside its last record is refused, not read short.
        assert!(scan_snapshot(Path::new("s"), &data[..data.len() - 3], false, |_| ()).is_err());
    }

    #[test]
    fn the_window_grows_only_for_a_record_bigger_than_it_and_shrinks_back_after() {
        let (data, _, lens) = writes_with_a_big_one(60_000, 30_000);
        let mut window = Window::new(Reading {
            interrupt: true,
            ..Reading::of(&data, 100_000)
        });
        let mut read = 0;
        let mut sizes = Vec::new();
        loop {
            match record::decode_ref(window.bytes()) {
                Ok((_, used)) => {
                    assert_eq!(used, lens[read], "record {read}");
                    read += 1;
                    window.take(used);
                }
                Err(FrameError::Truncated) => {
                    if !window.refill().unwrap() {
                        break;
                    }
                    sizes.push((read, window.buf.len()));
                }
                Err(e) => panic!("record {read}: {e}"),
            }
        }
        assert_eq!(read, lens.len(), "every record, through the interruptions");
        assert!(window.bytes().is_empty());
        // A chunk until the big record, grown in a few doublings until it holds it, and a
        // chunk again after it.
        let at_big: Vec<usize> = (sizes.iter())
            .filter(|&&(at, _)| at == 30_000)
            .map(|&(_, size)| size)
            .collect();
        let grown = *at_big.iter().max().unwrap();
        assert!(
            grown >= lens[30_000] && grown <= 2 * lens[30_000],
            "{at_big:?}"
        );
        assert!(at_big.len() <= 8, "{at_big:?}");
        for &(at, size) in &sizes {
            assert!(at == 30_000 || size == SNAPSHOT_CHUNK, "at {at}: {size}");
        }
        assert_eq!(sizes.last().unwrap().1, SNAPSHOT_CHUNK, "after: {sizes:?}");
    }

    #[test]
    fn a_read_that_fails_ends_the_scan_naming_the_file() {
        let data = snapshot_of(&["a", "b"]);
        let input = Reading {
            fail_at_end: true,
            ..Reading::of(&data[..data.len() - 4], usize::MAX)
        };
        let err = scan_snapshot(Path::new("/data/s.snap"), input, false, |_| ()).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("/data/s.snap") && err.contains("the disk said no"),
            "{err}"
        );
    }
}

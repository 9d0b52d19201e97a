//! The on-disk encodings of the log and of snapshots. Every integer is little-endian.
//!
//! A **record** is one write: `len: u32 | crc32: u32 | payload`, the payload being the kind
//! (put, tombstone, or a snapshot's end), the version time, the node id, the key and the value.
//! The checksum covers the payload; the length is checked against the file and [`MAX_PAYLOAD`].
//!
//! A **snapshot** (format [`SNAPSHOT_FORMAT`]) is a 16-byte header (magic, format, and how many entries follow, as a hint)
//! and bare records, the last an end record counting the others. It is synced whole before it
//! is renamed into place, so any damage in it is damage.
//!
//! A **log** (format [`LOG_FORMAT`]) is a 24-byte header (magic, format, a random nonce, the
//! header's checksum) and one **group frame** per group commit:
//! `len: u32 | synced: u64 | header crc: u32 | crc: u32 | records`. Both checksums are salted
//! with the nonce, so nothing inside a group (a value a client wrote, say) can pass for a group
//! of this file. `synced` says how many bytes of the file were known to be on disk when the
//! group was written. Recovery uses the two to tell a tear (the unsynced tail a crash left,
//! cut off) from damage to data that was synced and acknowledged (refused): see
//! [`scan`](super::scan).

use crate::entry::{Entry, Write};
use crate::version::{NodeId, Version};

/// Format of snapshots. Bump on any incompatible change: a build refuses formats it does not
/// know, rather than guess.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Format of logs. Bump on any incompatible change, as for snapshots.
pub const LOG_FORMAT: u32 = 3;
/// Magic at the start of every log file.
pub const LOG_MAGIC: &[u8; 8] = b"KVSTLOG\n";
/// Magic at the start of every snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"KVSTSNP\n";
/// Bytes of a snapshot's header: 8 of magic, 4 of format, 4 of entry count (a hint; 0 from
/// builds before it was written).
pub const SNAPSHOT_HEADER_LEN: usize = 16;
/// Bytes of a log's header: 8 of magic, 4 of format, 4 of nonce, 4 of checksum (of the 16
/// before), 4 reserved. The checksum guards the nonce: with a damaged nonce no group of the file
/// would check out, and the whole log would look like one torn tail.
pub const LOG_HEADER_LEN: usize = 24;
/// Bytes of a group frame before its records.
pub const GROUP_HEADER_LEN: usize = 20;
/// Bytes of a frame before its payload.
pub const FRAME_LEN: usize = 8;
/// Smallest valid payload: kind, time, node length, key length. Zero-filled space never
/// parses as a record because of this floor.
pub const MIN_PAYLOAD: usize = 1 + 8 + 2 + 4;
/// Largest payload we will believe: a key, a value and a version can never need more. A length
/// beyond it is damage, not a record.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// Most bytes a key and a value may hold together: what one record holds, less room for its
/// other fields. A write over it would be logged and acknowledged, then read back as damage at
/// the next start, so a node's limits must stay within it.
pub const MAX_WRITE_BYTES: usize = MAX_PAYLOAD - 64 * 1024;
// A record's own fields (kind, time, lengths, node id) fit in the room left.
const _: () =
    assert!(MIN_PAYLOAD + 4 + crate::version::MAX_NODE_ID_BYTES < MAX_PAYLOAD - MAX_WRITE_BYTES);

const KIND_PUT: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// Last record of a snapshot: the number of entries before it, proving the file is whole.
const KIND_END: u8 = 0xEE;

/// A snapshot's header.
pub fn snapshot_header() -> [u8; SNAPSHOT_HEADER_LEN] {
    let mut h = [0u8; SNAPSHOT_HEADER_LEN];
    h[..8].copy_from_slice(SNAPSHOT_MAGIC);
    h[8..12].copy_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    h
}

/// Notes in a snapshot's header (its last 4 bytes, which builds before wrote as zero and
/// which none checks) how many entries follow, so that recovery can size the map once. A hint only:
/// the end record is what counts.
pub fn set_snapshot_entries(bytes: &mut [u8], entries: u64) {
    let hint = u32::try_from(entries).unwrap_or(u32::MAX);
    bytes[12..16].copy_from_slice(&hint.to_le_bytes());
}

/// The entries a snapshot's header says follow; 0 if it says none (an older build's).
pub fn snapshot_entries(header: &[u8; SNAPSHOT_HEADER_LEN]) -> usize {
    u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize
}

/// A log's header, with the nonce that salts its groups' checksums.
pub fn log_header(nonce: u32) -> [u8; LOG_HEADER_LEN] {
    let mut h = [0u8; LOG_HEADER_LEN];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..12].copy_from_slice(&LOG_FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&nonce.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A nonce for a new log. Not secret in any cryptographic sense, only unknowable to clients:
/// `RandomState` draws its keys from the OS's randomness, and each call moves them on.
pub fn new_nonce() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() as u32
}

/// Checks the magic and format at the start of a file. Errors say what is wrong, for the
/// caller to attach the file name.
fn check_magic_and_format(bytes: &[u8], magic: &[u8; 8], format: u32) -> Result<(), String> {
    if bytes.len() < 12 {
        return Err(format!(
            "file too short for a header ({} bytes)",
            bytes.len()
        ));
    }
    if &bytes[..8] != magic {
        return Err(format!(
            "bad magic {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[..8]),
            String::from_utf8_lossy(magic)
        ));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if found != format {
        return Err(format!(
            "format version {found}, and this build reads only version {format}"
        ));
    }
    Ok(())
}

/// Checks a snapshot's header; returns where its first record starts.
pub fn check_snapshot_header(bytes: &[u8]) -> Result<usize, String> {
    check_magic_and_format(bytes, SNAPSHOT_MAGIC, SNAPSHOT_FORMAT)?;
    if bytes.len() < SNAPSHOT_HEADER_LEN {
        return Err(format!(
            "file too short for a header ({} bytes)",
            bytes.len()
        ));
    }
    Ok(SNAPSHOT_HEADER_LEN)
}

/// Checks a log's header; returns its nonce.
pub fn check_log_header(bytes: &[u8]) -> Result<u32, String> {
    check_magic_and_format(bytes, LOG_MAGIC, LOG_FORMAT)?;
    if bytes.len() < LOG_HEADER_LEN {
        return Err(format!(
            "file too short for a header ({} bytes)",
            bytes.len()
        ));
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    if crc32fast::hash(&bytes[..16]) != crc {
        return Err("header checksum mismatch".into());
    }
    Ok(u32::from_le_bytes(bytes[12..16].try_into().unwrap()))
}

/// The frame header of a group holding `records` (framed records, back to back), written when
/// the file's first `synced` bytes were known to be on disk.
pub fn group_header(nonce: u32, synced: u64, records: &[u8]) -> [u8; GROUP_HEADER_LEN] {
    let len = u32::try_from(records.len()).expect("a group commit over 4 GiB");
    let mut h = [0u8; GROUP_HEADER_LEN];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..12].copy_from_slice(&synced.to_le_bytes());
    h[12..16].copy_from_slice(&group_header_crc(nonce, len, synced).to_le_bytes());
    h[16..20].copy_from_slice(&group_crc(nonce, records).to_le_bytes());
    h
}

/// The checksum of a group's records, salted with the file's nonce.
fn group_crc(nonce: u32, records: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&nonce.to_le_bytes());
    crc.update(records);
    crc.finalize()
}

/// The header's own checksum, over the nonce, the length and the sync mark: a search for the
/// next group after damage rejects almost every offset after hashing a few bytes, not the
/// length it reads, and a damaged mark is a damaged group.
fn group_header_crc(nonce: u32, len: u32, synced: u64) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&nonce.to_le_bytes());
    crc.update(&len.to_le_bytes());
    crc.update(&synced.to_le_bytes());
    crc.finalize()
}

/// A group frame, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group<'a> {
    /// Its records, framed, back to back.
    pub records: &'a [u8],
    /// Bytes it took, header included.
    pub used: usize,
    /// Bytes of the file that were synced when it was written.
    pub synced: u64,
}

/// Reads the group frame at the start of `data`, in a log whose header holds `nonce`.
pub fn decode_group(data: &[u8], nonce: u32) -> Result<Group<'_>, FrameError> {
    if data.len() < GROUP_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let len = word(0);
    let synced = u64::from_le_bytes(data[4..12].try_into().unwrap());
    if group_header_crc(nonce, len, synced) != word(12) {
        return Err(FrameError::BadGroupHeader);
    }
    let end = GROUP_HEADER_LEN + len as usize;
    if data.len() < end {
        return Err(FrameError::Truncated);
    }
    let records = &data[GROUP_HEADER_LEN..end];
    if group_crc(nonce, records) != word(16) {
        return Err(FrameError::BadChecksum);
    }
    Ok(Group {
        records,
        used: end,
        synced,
    })
}

/// What a record holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Write(Write),
    /// End of a snapshot, with its entry count.
    End(u64),
}

/// Appends the framed encoding of `write` to `out`. Node ids are at most
/// [`MAX_NODE_ID_BYTES`](crate::version::MAX_NODE_ID_BYTES) (checked where writes enter a node),
/// so their length always fits the format's 16 bits.
pub fn encode_write(write: &Write, out: &mut Vec<u8>) {
    encode(
        &write.key,
        write.entry.version,
        write.entry.value.as_deref(),
        out,
    );
}

/// [`encode_write`] from borrowed parts (`value = None` for a tombstone), for callers that
/// hold a map entry and should not copy it into a [`Write`] first.
pub fn encode(key: &str, version: Version, value: Option<&str>, out: &mut Vec<u8>) {
    let node = version.node.as_bytes();
    assert!(
        node.len() <= crate::version::MAX_NODE_ID_BYTES,
        "node id of {} bytes reached the log",
        node.len()
    );
    let value = value.map(str::as_bytes);
    let payload_len = MIN_PAYLOAD + node.len() + key.len() + value.map_or(0, |v| 4 + v.len());
    let start = out.len();
    out.reserve(FRAME_LEN + payload_len);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // checksum, filled in below
    out.push(if value.is_some() {
        KIND_PUT
    } else {
        KIND_TOMBSTONE
    });
    out.extend_from_slice(&version.time.to_le_bytes());
    out.extend_from_slice(&(node.len() as u16).to_le_bytes());
    out.extend_from_slice(node);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Some(value) = value {
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    let crc = crc32fast::hash(&out[start + FRAME_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes [`encode_write`] appends for `write`.
pub fn encoded_len(write: &Write) -> usize {
    let value = write.entry.value.as_ref().map(|v| v.len());
    write_len(write.key.len(), value, write.entry.version.node.len())
}

/// Bytes of the record of a write with a key of `key` bytes, a value of `value` bytes (`None`
/// for a tombstone), by a node whose id takes `node` bytes.
pub fn write_len(key: usize, value: Option<usize>, node: usize) -> usize {
    FRAME_LEN + MIN_PAYLOAD + node + key + value.map_or(0, |v| 4 + v)
}

/// Appends a snapshot's end record.
pub fn encode_end(count: u64, out: &mut Vec<u8>) {
    let mut payload = vec![KIND_END];
    payload.extend_from_slice(&count.to_le_bytes());
    payload.resize(MIN_PAYLOAD, 0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Why a frame could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The frame runs past the end of the data: a torn tail, or a damaged length.
    Truncated,
    /// The length is impossible.
    BadLength(usize),
    /// The checksum does not match.
    BadChecksum,
    /// A group frame's header does not match its own checksum.
    BadGroupHeader,
    /// A record inside a group whose checksum matches does not read.
    InGroup(String),
    /// The checksum matches but the payload does not parse.
    BadPayload(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("record runs past the end of the file"),
            Self::BadLength(n) => write!(f, "impossible record length {n}"),
            Self::BadChecksum => f.write_str("checksum mismatch"),
            Self::BadGroupHeader => f.write_str("bad group header"),
            Self::InGroup(why) => f.write_str(why),
            Self::BadPayload(why) => write!(f, "malformed record: {why}"),
        }
    }
}

/// A write as it lies in a record, borrowed from the bytes read: what recovery applies to the
/// map without copying each field into a [`Write`] on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRef<'a> {
    pub key: &'a str,
    pub time: u64,
    /// The writer's node id as stored (interning it is the caller's choice).
    pub node: &'a str,
    /// `None` for a tombstone.
    pub value: Option<&'a str>,
}

impl WriteRef<'_> {
    /// The write, copied out.
    pub fn to_write(&self) -> Write {
        Write {
            key: self.key.to_owned(),
            entry: Entry {
                value: self.value.map(Box::from),
                version: Version {
                    time: self.time,
                    node: NodeId::known(self.node),
                },
            },
        }
    }
}

/// What a record holds, borrowed from the bytes read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRef<'a> {
    Write(WriteRef<'a>),
    /// End of a snapshot, with its entry count.
    End(u64),
}

impl RecordRef<'_> {
    /// The record, copied out.
    pub fn to_record(&self) -> Record {
        match self {
            Self::Write(w) => Record::Write(w.to_write()),
            Self::End(n) => Record::End(*n),
        }
    }
}

/// Reads the frame at the start of `data`: the record and the bytes it took.
pub fn decode(data: &[u8]) -> Result<(Record, usize), FrameError> {
    decode_ref(data).map(|(record, used)| (record.to_record(), used))
}

/// [`decode`], borrowing the record's fields from `data`.
pub fn decode_ref(data: &[u8]) -> Result<(RecordRef<'_>, usize), FrameError> {
    decode_frame(data, true)
}

/// [`decode_ref`] of a frame that [`decode_ref`] has already read whole, so its checksum is
/// not computed again. Panics if it does not read (a bug: the bytes changed in between).
pub fn decode_checked(data: &[u8]) -> (RecordRef<'_>, usize) {
    decode_frame(data, false).expect("a frame read once reads again")
}

fn decode_frame(data: &[u8], check_crc: bool) -> Result<(RecordRef<'_>, usize), FrameError> {
    if data.len() < FRAME_LEN {
        return Err(FrameError::Truncated);
    }
    let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    if !(MIN_PAYLOAD..=MAX_PAYLOAD).contains(&len) {
        return Err(FrameError::BadLength(len));
    }
    if data.len() < FRAME_LEN + len {
        return Err(FrameError::Truncated);
    }
    let crc = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let payload = &data[FRAME_LEN..FRAME_LEN + len];
    if check_crc && crc32fast::hash(payload) != crc {
        return Err(FrameError::BadChecksum);
    }
    let record = parse_payload(payload).map_err(FrameError::BadPayload)?;
    Ok((record, FRAME_LEN + len))
}

fn parse_payload(p: &[u8]) -> Result<RecordRef<'_>, String> {
    let mut r = Reader(p);
    let kind = r.u8()?;
    if kind == KIND_END {
        return Ok(RecordRef::End(r.u64()?));
    }
    let time = r.u64()?;
    let node_len = r.u16()? as usize;
    let node = r.str(node_len)?;
    let key_len = r.u32()? as usize;
    let key = r.str(key_len)?;
    let value = match kind {
        KIND_PUT => {
            let len = r.u32()? as usize;
            Some(r.str(len)?)
        }
        KIND_TOMBSTONE => None,
        other => return Err(format!("unknown record kind {other}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(RecordRef::Write(WriteRef {
        key,
        time,
        node,
        value,
    }))
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("field runs past the record".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn str(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?).map_err(|_| "text is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, value: Option<&str>) -> Write {
        Write {
            key: key.into(),
            entry: Entry {
                value: value.map(Into::into),
                version: Version {
                    time: 0x0102_0304_0506_0708,
                    node: NodeId::new("node-1").unwrap(),
                },
            },
        }
    }

    #[test]
    fn records_round_trip() {
        for w in [
            write("k", Some("v")),
            write("ключ", Some("")),
            write("gone", None),
        ] {
            let mut buf = Vec::new();
            encode_write(&w, &mut buf);
            assert_eq!(buf.len(), encoded_len(&w));
            assert_eq!(decode(&buf), Ok((Record::Write(w), buf.len())));
        }
        let mut buf = Vec::new();
        encode_end(42, &mut buf);
        assert_eq!(decode(&buf), Ok((Record::End(42), buf.len())));
    }

    #[test]
    fn damage_is_detected() {
        let mut buf = Vec::new();
        encode_write(&write("key", Some("value")), &mut buf);
        assert_eq!(decode(&buf[..buf.len() - 1]), Err(FrameError::Truncated));
        assert_eq!(decode(&buf[..3]), Err(FrameError::Truncated));
        let mut flipped = buf.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&flipped), Err(FrameError::BadChecksum));
        assert_eq!(decode(&[0u8; 64]), Err(FrameError::BadLength(0)));
    }

    #[test]
    fn groups_round_trip_and_damage_is_detected() {
        let mut records = Vec::new();
        encode_write(&write("a", Some("1")), &mut records);
        encode_write(&write("b", None), &mut records);
        let mut group = group_header(7, 1234, &records).to_vec();
        group.extend(&records);
        assert_eq!(
            decode_group(&group, 7),
            Ok(Group {
                records: &records[..],
                used: group.len(),
                synced: 1234
            })
        );
        // Another file's nonce: not a group of this file, from its header on.
        assert_eq!(decode_group(&group, 8), Err(FrameError::BadGroupHeader));
        assert_eq!(
            decode_group(&group[..group.len() - 1], 7),
            Err(FrameError::Truncated)
        );
        let mut flipped = group.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode_group(&flipped, 7), Err(FrameError::BadChecksum));
        let mut longer = group.clone();
        longer[0] ^= 1;
        assert_eq!(decode_group(&longer, 7), Err(FrameError::BadGroupHeader));
        // A damaged sync mark could vouch for bytes that were never synced: it fails the header.
        let mut marked = group.clone();
        marked[5] ^= 1;
        assert_eq!(decode_group(&marked, 7), Err(FrameError::BadGroupHeader));
        // A bare record is not a group.
        assert!(decode_group(&records, 7).is_err());
    }

    #[test]
    fn headers_of_another_kind_or_format_are_refused() {
        assert_eq!(
            check_snapshot_header(&snapshot_header()),
            Ok(SNAPSHOT_HEADER_LEN)
        );
        assert_eq!(check_log_header(&log_header(42)), Ok(42));
        // A damaged nonce is a damaged header, never a log whose groups all fail.
        let mut flipped = log_header(42);
        flipped[13] ^= 4;
        assert!(check_log_header(&flipped).unwrap_err().contains("checksum"));
        assert_ne!(new_nonce(), new_nonce());
        assert!(
            check_log_header(&snapshot_header())
                .unwrap_err()
                .contains("magic")
        );
        assert!(
            check_snapshot_header(&log_header(1))
                .unwrap_err()
                .contains("magic")
        );
        // A format this build does not know, older or newer, is refused by number.
        for format in [1, 2, 4] {
            let mut other = log_header(42);
            other[8..12].copy_from_slice(&u32::to_le_bytes(format));
            let err = check_log_header(&other).unwrap_err();
            assert!(
                err.contains(&format!("format version {format}")) && err.contains("only version 3"),
                "{err}"
            );
        }
        let mut newer = snapshot_header();
        newer[8] = 9;
        assert!(
            check_snapshot_header(&newer)
                .unwrap_err()
                .contains("version 9")
        );
        assert!(
            check_log_header(&log_header(1)[..10])
                .unwrap_err()
                .contains("too short")
        );
    }
}

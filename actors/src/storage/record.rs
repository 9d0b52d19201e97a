//! The on-disk encoding shared by the log and snapshots: files that start with a header (magic
//! and format version) followed by framed records, each `len: u32 | crc32: u32 | payload`.
//!
//! The checksum covers the payload; the length is checked against the file and against
//! [`MAX_PAYLOAD`]. Every integer is little-endian.
//!
//! Logs of format 2 and later wrap each group commit's records in a group frame,
//! `len: u32 | header crc: u32 | crc: u32 | records` in format 2, whose checksums are salted
//! with a random nonce kept in the file's header (itself checksummed). Recovery needs to tell a
//! torn last append (cut it off) from damage to data that was synced and acknowledged (refuse),
//! and does it by asking whether anything valid follows the damage. With bare records, the answer could be yes for a torn
//! append: its own later records, if its pages reached the disk out of order, or a record
//! inside a value that a client wrote. Nothing inside a group is a group, and no client can
//! write one, not knowing the nonce. Snapshots keep format 1: they are synced whole before they
//! are renamed into place, so any damage in one is damage.
//!
//! Logs of format 3 (every log written since) add to each group frame how much of the file was
//! synced when the group was written: `len: u32 | synced: u64 | header crc: u32 | crc: u32`.
//! With fsync before every ack, that is everything before the group, and damage with a valid
//! group after it is damage to synced data. With a sync only now and then (`--sync interval`,
//! `never`), a power cut can leave several unsynced groups in any state, and an intact group
//! after a torn one proves nothing: its mark says whether the torn bytes had been synced. So
//! the scan cuts damage that no later group vouches for, and refuses only damage to bytes that
//! a later group says were synced.

use crate::store::{Entry, Write};
use crate::version::{NodeId, Version};

/// Format of snapshots, and of logs written before group frames: bare records. Bump on any
/// incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Format of logs written before group frames carried a sync mark: records in group frames.
pub const GROUPED_FORMAT_VERSION: u32 = 2;
/// Format of logs written now: records in group frames that say how much of the file was synced
/// when they were written (see the module's doc).
pub const LOG_FORMAT_VERSION: u32 = 3;
/// Bytes of a format 1 file header: 8 of magic, 4 of version, 4 reserved.
pub const HEADER_LEN: usize = 16;
/// Bytes of a format 2 or 3 file header: 8 of magic, 4 of version, 4 of nonce, 4 of checksum (of
/// the 16 before), 4 reserved. The checksum guards the nonce: with a damaged nonce no group of the
/// file would check out, and the whole log would look like one torn tail.
pub const GROUPED_HEADER_LEN: usize = 24;
/// Bytes of a format 3 group frame before its records.
pub const GROUP_HEADER_LEN: usize = 20;
/// Bytes of a format 2 group frame before its records (no sync mark).
pub const V2_GROUP_HEADER_LEN: usize = 12;
/// Bytes of a frame before its payload.
pub const FRAME_LEN: usize = 8;
/// Smallest valid payload: kind, time, node length, key length. Zero-filled space never
/// parses as a record because of this floor.
pub const MIN_PAYLOAD: usize = 1 + 8 + 2 + 4;
/// Largest payload we will believe: a key, a value and a version can never need more. A length
/// beyond it is damage, not a record.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

const KIND_PUT: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// Last record of a snapshot: the number of entries before it, proving the file is whole.
const KIND_END: u8 = 0xEE;

/// A format 1 file header for `magic` (snapshots).
pub fn header(magic: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// A file header of the current log format for `magic`, with the nonce that salts its groups'
/// checksums.
pub fn grouped_header(magic: &[u8; 8], nonce: u32) -> [u8; GROUPED_HEADER_LEN] {
    grouped_header_of(LOG_FORMAT_VERSION, magic, nonce)
}

/// A format 2 or 3 file header (format 2 only for tests that read old logs).
pub(crate) fn grouped_header_of(
    version: u32,
    magic: &[u8; 8],
    nonce: u32,
) -> [u8; GROUPED_HEADER_LEN] {
    let mut h = [0u8; GROUPED_HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
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

/// What a file header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FORMAT_VERSION`], [`GROUPED_FORMAT_VERSION`] or [`LOG_FORMAT_VERSION`].
    pub version: u32,
    /// The salt of a format 2 or 3 file's group checksums.
    pub nonce: u32,
    /// Bytes of the header: where the first record or group starts.
    pub len: usize,
}

/// Checks a header. Errors say what is wrong, for the caller to attach the file name.
pub fn check_header(bytes: &[u8], magic: &[u8; 8]) -> Result<Header, String> {
    if bytes.len() < HEADER_LEN {
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
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if !(FORMAT_VERSION..=LOG_FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "format version {version}, this build reads versions {FORMAT_VERSION} to \
             {LOG_FORMAT_VERSION}"
        ));
    }
    if version == FORMAT_VERSION {
        return Ok(Header {
            version,
            nonce: 0,
            len: HEADER_LEN,
        });
    }
    if bytes.len() < GROUPED_HEADER_LEN {
        return Err(format!(
            "file too short for a format {version} header ({} bytes)",
            bytes.len()
        ));
    }
    let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    if crc32fast::hash(&bytes[..16]) != crc {
        return Err("header checksum mismatch".into());
    }
    let nonce = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    Ok(Header {
        version,
        nonce,
        len: GROUPED_HEADER_LEN,
    })
}

/// The frame header of a group holding `records` (framed records, back to back), written when
/// the file's first `synced` bytes were known to be on disk.
pub fn group_header(nonce: u32, synced: u64, records: &[u8]) -> [u8; GROUP_HEADER_LEN] {
    let len = u32::try_from(records.len()).expect("a group commit over 4 GiB");
    let mut h = [0u8; GROUP_HEADER_LEN];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..12].copy_from_slice(&synced.to_le_bytes());
    h[12..16].copy_from_slice(&group_header_crc(nonce, len, Some(synced)).to_le_bytes());
    h[16..20].copy_from_slice(&group_crc(nonce, records).to_le_bytes());
    h
}

/// A format 2 group's frame header (only for tests that read old logs).
#[cfg(test)]
pub(crate) fn v2_group_header(nonce: u32, records: &[u8]) -> [u8; V2_GROUP_HEADER_LEN] {
    let len = u32::try_from(records.len()).expect("a group commit over 4 GiB");
    let mut h = [0u8; V2_GROUP_HEADER_LEN];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&group_header_crc(nonce, len, None).to_le_bytes());
    h[8..12].copy_from_slice(&group_crc(nonce, records).to_le_bytes());
    h
}

/// The checksum of a group's records, salted with the file's nonce.
fn group_crc(nonce: u32, records: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&nonce.to_le_bytes());
    crc.update(records);
    crc.finalize()
}

/// The header's own checksum, over the nonce, the length and the sync mark (format 3): a search
/// for the next group after damage rejects almost every offset after hashing a few bytes, not
/// the length it reads, and a damaged mark is a damaged group.
fn group_header_crc(nonce: u32, len: u32, synced: Option<u64>) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&nonce.to_le_bytes());
    crc.update(&len.to_le_bytes());
    if let Some(synced) = synced {
        crc.update(&synced.to_le_bytes());
    }
    crc.finalize()
}

/// A group frame, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group<'a> {
    /// Its records, framed, back to back.
    pub records: &'a [u8],
    /// Bytes it took, header included.
    pub used: usize,
    /// Bytes of the file that were synced when it was written (format 3; format 2 does not
    /// say).
    pub synced: Option<u64>,
}

/// Reads the group frame at the start of `data`, in a log of format `version` (2 or 3) whose
/// header holds `nonce`.
pub fn decode_group(data: &[u8], version: u32, nonce: u32) -> Result<Group<'_>, FrameError> {
    let marked = version >= LOG_FORMAT_VERSION;
    let header_len = if marked {
        GROUP_HEADER_LEN
    } else {
        V2_GROUP_HEADER_LEN
    };
    if data.len() < header_len {
        return Err(FrameError::Truncated);
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let len = word(0);
    let (synced, header_crc, crc) = if marked {
        let synced = u64::from_le_bytes(data[4..12].try_into().unwrap());
        (Some(synced), word(12), word(16))
    } else {
        (None, word(4), word(8))
    };
    if group_header_crc(nonce, len, synced) != header_crc {
        return Err(FrameError::BadGroupHeader);
    }
    let end = header_len + len as usize;
    if data.len() < end {
        return Err(FrameError::Truncated);
    }
    let records = &data[header_len..end];
    if group_crc(nonce, records) != crc {
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

/// Reads the frame at the start of `data`: the record and the bytes it took.
pub fn decode(data: &[u8]) -> Result<(Record, usize), FrameError> {
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
    if crc32fast::hash(payload) != crc {
        return Err(FrameError::BadChecksum);
    }
    let record = parse_payload(payload).map_err(FrameError::BadPayload)?;
    Ok((record, FRAME_LEN + len))
}

fn parse_payload(p: &[u8]) -> Result<Record, String> {
    let mut r = Reader(p);
    let kind = r.u8()?;
    if kind == KIND_END {
        return Ok(Record::End(r.u64()?));
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
    Ok(Record::Write(Write {
        key,
        entry: Entry {
            value: value.map(String::into_boxed_str),
            version: Version {
                time,
                node: NodeId::from_disk(&node),
            },
        },
    }))
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
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
    fn str(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "text is not UTF-8".into())
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
        let v3 = LOG_FORMAT_VERSION;
        let mut group = group_header(7, 1234, &records).to_vec();
        group.extend(&records);
        assert_eq!(
            decode_group(&group, v3, 7),
            Ok(Group {
                records: &records[..],
                used: group.len(),
                synced: Some(1234)
            })
        );
        // Another file's nonce: not a group of this file, from its header on.
        assert_eq!(decode_group(&group, v3, 8), Err(FrameError::BadGroupHeader));
        assert_eq!(
            decode_group(&group[..group.len() - 1], v3, 7),
            Err(FrameError::Truncated)
        );
        let mut flipped = group.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode_group(&flipped, v3, 7), Err(FrameError::BadChecksum));
        let mut longer = group.clone();
        longer[0] ^= 1;
        assert_eq!(
            decode_group(&longer, v3, 7),
            Err(FrameError::BadGroupHeader)
        );
        // A damaged sync mark could vouch for bytes that were never synced: it fails the header.
        let mut marked = group.clone();
        marked[5] ^= 1;
        assert_eq!(
            decode_group(&marked, v3, 7),
            Err(FrameError::BadGroupHeader)
        );
        // A bare record is not a group.
        assert!(decode_group(&records, v3, 7).is_err());
        // Format 2 groups have no mark, and the formats do not read each other's groups.
        let mut old = v2_group_header(7, &records).to_vec();
        old.extend(&records);
        assert_eq!(
            decode_group(&old, GROUPED_FORMAT_VERSION, 7),
            Ok(Group {
                records: &records[..],
                used: old.len(),
                synced: None
            })
        );
        assert!(decode_group(&old, v3, 7).is_err());
        assert!(decode_group(&group, GROUPED_FORMAT_VERSION, 7).is_err());
    }

    #[test]
    fn headers() {
        let h = header(b"KVSTLOG\n");
        assert_eq!(
            check_header(&h, b"KVSTLOG\n"),
            Ok(Header {
                version: FORMAT_VERSION,
                nonce: 0,
                len: HEADER_LEN
            })
        );
        let grouped = grouped_header(b"KVSTLOG\n", 42);
        assert_eq!(
            check_header(&grouped, b"KVSTLOG\n"),
            Ok(Header {
                version: LOG_FORMAT_VERSION,
                nonce: 42,
                len: GROUPED_HEADER_LEN
            })
        );
        let old = grouped_header_of(GROUPED_FORMAT_VERSION, b"KVSTLOG\n", 42);
        assert_eq!(
            check_header(&old, b"KVSTLOG\n").map(|h| h.version),
            Ok(GROUPED_FORMAT_VERSION)
        );
        // A damaged nonce is a damaged header, never a log whose groups all fail.
        let mut flipped = grouped;
        flipped[13] ^= 4;
        assert!(
            check_header(&flipped, b"KVSTLOG\n")
                .unwrap_err()
                .contains("checksum")
        );
        assert_ne!(new_nonce(), new_nonce());
        assert!(
            check_header(&h, b"KVSTSNP\n")
                .unwrap_err()
                .contains("magic")
        );
        let mut future = h;
        future[8] = 9;
        assert!(
            check_header(&future, b"KVSTLOG\n")
                .unwrap_err()
                .contains("version 9")
        );
    }
}

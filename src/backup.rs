//! Backups: the file `kvstore-cli ADDR backup FILE` writes from a node's `Backup` stream, and
//! `kvstore-server --restore FILE` seeds a new node from.
//!
//! A backup holds every entry of the node, tombstones included, each with its version, so that
//! restored data merges with a cluster's by the usual rule (the newer version wins). The format,
//! all integers little-endian:
//!
//! ```text
//! "KVBACKUP" u32 format (1)
//! record*:   u32 length (< 0xFFFF_FFFF)  u32 CRC-32 of the payload  payload
//! end:       u32 0xFFFF_FFFF  u64 records  u32 CRC-32 of every byte from the magic to here
//! ```
//!
//! Each payload is one `kvstore.v1.KeyValue` (key, value, version, deleted) in protobuf. A file
//! is written beside its name and renamed into place once synced, so a backup that did not
//! finish never looks like one that did; one that was cut short or damaged since is refused
//! whole at restore, naming the byte where it goes wrong, before anything is restored.

use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use kvstore_actors::Write;
use prost::Message;

use crate::client::Client;
use crate::error::Error;
use crate::pb::KeyValue;

const MAGIC: &[u8; 8] = b"KVBACKUP";
const FORMAT: u32 = 1;
const END: u32 = u32::MAX;
/// Largest record: a key and value at the most any node allows, and the rest of the message.
const MAX_RECORD: u32 = (kvstore_actors::MAX_WRITE_BYTES + 64 * 1024) as u32;

/// What a backup holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub tombstones: u64,
    pub bytes: u64,
}

fn io_error(path: &Path, doing: &str) -> impl Fn(std::io::Error) -> Error {
    let path = path.display().to_string();
    let doing = doing.to_string();
    move |e| Error::InvalidArgument(format!("{doing} {path}: {e}"))
}

/// Backs up the node `client` talks to into `path`: streams every entry, writes them, syncs,
/// and renames the file into place.
pub async fn write(client: &Client, path: &Path) -> Result<Summary, Error> {
    // Checked before the stream: a backup of a big node takes a while, and then could not
    // be put in place.
    if path.file_name().is_none() {
        return Err(Error::InvalidArgument(format!(
            "backup needs a file to write, and '{}' names none",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "backup needs a file to write, and {} is a directory",
            path.display()
        )));
    }
    let partial = partial_path(path);
    let result = write_to(client, &partial, path).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

async fn write_to(client: &Client, partial: &Path, path: &Path) -> Result<Summary, Error> {
    let mut out = Writer::create(partial)?;
    let mut stream = client.backup_stream().await.map_err(Error::Call)?;
    while let Some(entry) = stream.next().await {
        out.add(&entry.map_err(Error::Call)?)?;
    }
    let summary = out.finish()?;
    std::fs::rename(partial, path).map_err(io_error(path, "renaming the backup to"))?;
    Ok(summary)
}

/// Writes a backup file entry by entry: what [`write`] does with a node's stream, for tools
/// that make a backup from elsewhere (a migration, a test's data set).
pub struct Writer {
    out: Checksummed<BufWriter<std::fs::File>>,
    path: PathBuf,
    summary: Summary,
    payload: Vec<u8>,
}

impl Writer {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path) -> Result<Self, Error> {
        let file = std::fs::File::create(path).map_err(io_error(path, "creating"))?;
        let mut writer = Self {
            out: Checksummed::new(BufWriter::new(file)),
            path: path.to_path_buf(),
            summary: Summary::default(),
            payload: Vec::new(),
        };
        writer.put(MAGIC)?;
        writer.put(&FORMAT.to_le_bytes())?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        (self.out.put(bytes)).map_err(io_error(&self.path, "writing"))
    }

    /// Adds one entry (a tombstone if `entry.deleted`).
    pub fn add(&mut self, entry: &KeyValue) -> Result<(), Error> {
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        entry.encode(&mut payload).expect("a Vec grows as needed");
        self.put(&(payload.len() as u32).to_le_bytes())?;
        self.put(&crc32fast::hash(&payload).to_le_bytes())?;
        self.put(&payload)?;
        self.payload = payload;
        self.summary.entries += 1;
        self.summary.tombstones += u64::from(entry.deleted);
        Ok(())
    }

    /// Writes the trailer and syncs the file to disk.
    pub fn finish(mut self) -> Result<Summary, Error> {
        self.put(&END.to_le_bytes())?;
        self.put(&self.summary.entries.to_le_bytes())?;
        let sum = self.out.sum();
        self.put(&sum.to_le_bytes())?;
        self.summary.bytes = self.out.written;
        let failed = io_error(&self.path, "writing");
        let file = self
            .out
            .into_inner()
            .into_inner()
            .map_err(|e| failed(e.into_error()))?;
        file.sync_all().map_err(&failed)?;
        Ok(self.summary)
    }
}

/// A writer that keeps a running CRC-32 and count of what went through it.
struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: std::io::Write> Checksummed<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            crc: crc32fast::Hasher::new(),
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.written += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    fn sum(&self) -> u32 {
        self.crc.clone().finalize()
    }

    fn into_inner(self) -> W {
        self.inner
    }
}

/// A damaged backup: `offset` is where the damage shows.
fn damaged(path: &Path, offset: u64, reason: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!(
        "--restore {}: not a usable backup, at byte {offset}: {reason}; nothing was restored",
        path.display()
    ))
}

/// Reads the backup at `path`, handing its entries to `each` in batches of at most `batch`.
/// Every record is checked as it is read; call [`verify`] first to refuse a damaged file
/// before anything is handed over.
pub fn read(
    path: &Path,
    batch: usize,
    mut each: impl FnMut(Vec<Write>) -> Result<(), Error>,
) -> Result<Summary, Error> {
    let file = std::fs::File::open(path).map_err(io_error(path, "--restore: opening"))?;
    let len = file
        .metadata()
        .map_err(io_error(path, "--restore: reading"))?
        .len();
    let mut input = Reader {
        inner: BufReader::new(file),
        path,
        offset: 0,
        len,
        crc: crc32fast::Hasher::new(),
    };
    let magic = input.take(8, "the header")?;
    if magic != MAGIC {
        return Err(damaged(path, 0, "it does not begin with KVBACKUP"));
    }
    let format = u32::from_le_bytes(input.take(4, "the header")?.try_into().unwrap());
    if format != FORMAT {
        return Err(damaged(
            path,
            8,
            format!("format {format}, and this build reads format {FORMAT}"),
        ));
    }
    let mut summary = Summary::default();
    let mut pending = Vec::new();
    loop {
        let at = input.offset;
        let length = u32::from_le_bytes(input.take(4, "a record")?.try_into().unwrap());
        if length == END {
            break;
        }
        if length > MAX_RECORD {
            return Err(damaged(path, at, format!("a record of {length} bytes")));
        }
        let crc = u32::from_le_bytes(input.take(4, "a record")?.try_into().unwrap());
        if input.offset + u64::from(length) > len {
            return Err(damaged(
                path,
                at,
                format!(
                    "a record of {length} bytes runs past the end of the file (damaged, or cut short)"
                ),
            ));
        }
        let payload = input.take(length as usize, "a record")?;
        if crc32fast::hash(&payload) != crc {
            return Err(damaged(path, at, "a record whose checksum does not match"));
        }
        let entry = KeyValue::decode(payload.as_slice())
            .map_err(|e| damaged(path, at, format!("a record that does not decode: {e}")))?;
        let write = crate::wire::checked(entry)
            .map_err(|e| damaged(path, at, format!("an entry that cannot be restored: {e}")))?;
        summary.entries += 1;
        summary.tombstones += u64::from(write.entry.value.is_none());
        pending.push(write);
        if pending.len() >= batch {
            each(std::mem::take(&mut pending))?;
        }
    }
    let end = input.offset - 4;
    let records = u64::from_le_bytes(input.take(8, "the end")?.try_into().unwrap());
    if records != summary.entries {
        return Err(damaged(
            path,
            end,
            format!(
                "the end says {records} records, and {} were read",
                summary.entries
            ),
        ));
    }
    let sum = input.crc.clone().finalize();
    let stored = u32::from_le_bytes(input.take(4, "the end")?.try_into().unwrap());
    if stored != sum {
        return Err(damaged(path, end, "the file's checksum does not match"));
    }
    if input.offset != len {
        return Err(damaged(path, input.offset, "bytes after the end"));
    }
    if !pending.is_empty() {
        each(pending)?;
    }
    summary.bytes = len;
    Ok(summary)
}

/// Reads the whole backup at `path` and checks it, restoring nothing.
pub fn verify(path: &Path) -> Result<Summary, Error> {
    read(path, 1, |_| Ok(()))
}

/// The file being read, with where it is and a running CRC-32 of what was read.
struct Reader<'a> {
    inner: BufReader<std::fs::File>,
    path: &'a Path,
    offset: u64,
    len: u64,
    crc: crc32fast::Hasher,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>, Error> {
        if self.offset + n as u64 > self.len {
            return Err(damaged(
                self.path,
                self.offset,
                format!(
                    "the file ends {} bytes into {what} of {n} (cut short?)",
                    self.len - self.offset
                ),
            ));
        }
        let mut bytes = vec![0; n];
        self.inner
            .read_exact(&mut bytes)
            .map_err(|e| damaged(self.path, self.offset, e))?;
        self.crc.update(&bytes);
        self.offset += n as u64;
        Ok(bytes)
    }
}

/// A data dir a node may be restored into: absent, or empty.
pub fn check_empty(dir: &Path) -> Result<(), Error> {
    // A join asked for, and the node's name, are no data: a new node may join and be seeded
    // from a backup.
    let data = |entry: &std::io::Result<std::fs::DirEntry>| {
        (entry.as_ref()).map_or(true, |e| {
            let name = e.file_name();
            name != crate::membership::JOINING_FILE && name != crate::membership::MEMBER_FILE
        })
    };
    match std::fs::read_dir(dir).map(|mut entries| !entries.any(|e| data(&e))) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dir, "--restore: reading the data dir")(e)),
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::InvalidArgument(format!(
            "--restore needs an empty --data-dir, and {} holds data: a restore seeds a new node",
            dir.display()
        ))),
    }
}

//! The files of a data dir, as storage touches them: the one seam between storage and the
//! operating system. [`OsDir`] is the real data dir; tests use `crash::CrashDir`, which
//! keeps in memory what a disk would keep through a power cut (what was synced) and loses the
//! rest when told to crash.
//!
//! Everything storage does to its files goes through these two traits: the log writer's
//! appends, syncs and truncations, the creation and renaming of logs and snapshots, and the
//! directory syncs that make those names durable. So a test can stop the node at any of those
//! steps, crash, and recover from exactly what a disk would hold.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// A data directory: flat, holding the files of one node's storage.
pub trait DataDir: Send + Sync + 'static {
    /// Where it is, for messages.
    fn path(&self) -> &Path;
    /// The names of the files in it.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole contents of `name`.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// The length of `name`, in bytes.
    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(self.read(name)?.len() as u64)
    }
    /// `name`, open for reading front to back.
    fn open_read(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(name)?)))
    }
    /// Creates `name`, or empties it if it exists, open for appending.
    fn create(&self, name: &str) -> io::Result<Box<dyn AppendFile>>;
    /// Opens `name` for appending at its end.
    fn open_append(&self, name: &str) -> io::Result<Box<dyn AppendFile>>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the directory's entries durable: the files created, renamed or removed since the
    /// last call. Until then a power cut may undo any of those.
    fn sync(&self) -> io::Result<()>;
}

/// A file that storage writes at its end only.
pub trait AppendFile: Send {
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes every byte appended so far durable (the data, not necessarily the metadata that
    /// does not concern reading it back: `fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes; appending goes on from there.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// A data dir on the machine's file system, locked for as long as this value lives, so that
/// two nodes never share one.
pub struct OsDir {
    path: PathBuf,
    /// Holds the `flock` on `LOCK`.
    _lock: File,
}

impl OsDir {
    /// Opens (creating it if needed) and locks the data dir at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(path).map_err(Error::io(format!("creating {}", path.display())))?;
        let lock_path = path.join("LOCK");
        let lock = File::create(&lock_path)
            .map_err(Error::io(format!("opening {}", lock_path.display())))?;
        if lock.try_lock().is_err() {
            return Err(Error::Locked(path.to_path_buf()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

impl DataDir for OsDir {
    fn path(&self) -> &Path {
        &self.path
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in std::fs::read_dir(&self.path)? {
            names.push(item?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path.join(name))
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(std::fs::metadata(self.path.join(name))?.len())
    }

    fn open_read(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(File::open(self.path.join(name))?))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn AppendFile>> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.path.join(name))?;
        Ok(Box::new(OsFile(file)))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn AppendFile>> {
        let mut file = OpenOptions::new().write(true).open(self.path.join(name))?;
        file.seek(SeekFrom::End(0))?;
        Ok(Box::new(OsFile(file)))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

/// A file of an [`OsDir`].
struct OsFile(File);

impl AppendFile for OsFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)?;
        self.0.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

#[cfg(test)]
pub(crate) mod crash {
    //! A data dir in memory that behaves as a disk does through a power cut: a file keeps
    //! what was synced, a name what the directory's last sync saw. Tests run storage on it,
    //! stop it at a chosen operation, crash it, and recover from what is left.

    use std::collections::BTreeMap;
    use std::io;
    use std::path::Path;
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::{AppendFile, DataDir};

    /// One file's bytes: what was written, and what the last sync made durable.
    #[derive(Debug, Default)]
    struct Inode {
        data: Vec<u8>,
        synced: Vec<u8>,
    }

    type InodeRef = Arc<Mutex<Inode>>;

    #[derive(Default)]
    struct State {
        /// The names as reads see them.
        names: BTreeMap<String, InodeRef>,
        /// The names as of the last directory sync: what a crash leaves.
        durable_names: BTreeMap<String, InodeRef>,
        /// Writing operations left before the process "dies" (every later one fails).
        ops_left: Option<u64>,
        /// Writing operations left before one fails (an I/O error; the ones after work).
        fail_in: Option<u64>,
        /// Writing operations so far.
        ops: u64,
        /// Appends and creations fail as on a full disk.
        full: bool,
        /// Syncs of files so far.
        syncs: u64,
    }

    /// What of a file's unsynced bytes a crash leaves behind.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Tear {
        /// None: the file holds what was last synced (a power cut).
        Nothing,
        /// Half of them: a write torn part way.
        Half,
        /// All: the page cache made it to the disk (the process died, the machine did not).
        Everything,
    }

    /// A shared handle: clones are the same directory.
    #[derive(Clone, Default)]
    pub struct CrashDir(Arc<Mutex<State>>);

    fn dead() -> io::Error {
        io::Error::other("the process has crashed")
    }

    impl CrashDir {
        fn state(&self) -> MutexGuard<'_, State> {
            self.0.lock().unwrap()
        }

        /// Counts one writing operation; fails once the process has "died".
        fn op(state: &mut State) -> io::Result<()> {
            match &mut state.fail_in {
                Some(0) => {
                    state.fail_in = None;
                    return Err(io::Error::other("an injected I/O error"));
                }
                Some(left) => *left -= 1,
                None => {}
            }
            match &mut state.ops_left {
                Some(0) => Err(dead()),
                Some(left) => {
                    *left -= 1;
                    state.ops += 1;
                    Ok(())
                }
                None => {
                    state.ops += 1;
                    Ok(())
                }
            }
        }

        /// After `n` more writing operations (appends, syncs, truncations, creations, renames,
        /// removals), every one fails, as if the process had died there.
        pub fn die_after(&self, n: u64) {
            self.state().ops_left = Some(n);
        }

        /// After `n` more writing operations, the next one fails with an I/O error; the ones
        /// after it work again.
        pub fn fail_after(&self, n: u64) {
            self.state().fail_in = Some(n);
        }

        /// Writing operations so far.
        pub fn ops(&self) -> u64 {
            self.state().ops
        }

        /// Syncs of files so far.
        pub fn syncs(&self) -> u64 {
            self.state().syncs
        }

        /// Makes appends and creations fail as on a full disk (or not).
        pub fn set_full(&self, full: bool) {
            self.state().full = full;
        }

        /// The power cut: every name and byte that was not synced is gone (but for what `tear`
        /// leaves of the unsynced bytes), and operations work again, as for a restarted node.
        pub fn crash(&self, tear: Tear) {
            let mut state = self.state();
            let mut names = BTreeMap::new();
            for (name, inode) in &state.durable_names {
                let inode = inode.lock().unwrap();
                let mut data = inode.synced.clone();
                let written = &inode.data;
                if written.len() > data.len() && written.starts_with(&data) {
                    let extra = &written[data.len()..];
                    let kept = match tear {
                        Tear::Nothing => 0,
                        Tear::Half => extra.len() / 2,
                        Tear::Everything => extra.len(),
                    };
                    data.extend_from_slice(&extra[..kept]);
                }
                let survivor = Inode {
                    synced: data.clone(),
                    data,
                };
                names.insert(name.clone(), Arc::new(Mutex::new(survivor)));
            }
            state.durable_names = names.clone();
            state.names = names;
            state.ops_left = None;
        }

        /// A file's current contents, as reads see them.
        pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
            let state = self.state();
            state
                .names
                .get(name)
                .map(|i| i.lock().unwrap().data.clone())
        }

        /// Replaces a file's contents, synced (as damage on the disk would be).
        pub fn set_contents(&self, name: &str, data: Vec<u8>) {
            let state = self.state();
            let mut inode = state.names[name].lock().unwrap();
            inode.synced = data.clone();
            inode.data = data;
        }

        /// The names of the files, in order.
        pub fn names(&self) -> Vec<String> {
            self.state().names.keys().cloned().collect()
        }
    }

    struct CrashFile {
        dir: CrashDir,
        inode: InodeRef,
    }

    impl AppendFile for CrashFile {
        fn append(&mut self, data: &[u8]) -> io::Result<()> {
            let mut state = self.dir.state();
            CrashDir::op(&mut state)?;
            if state.full {
                // What a full disk does: part of the write lands, then ENOSPC.
                let mut inode = self.inode.lock().unwrap();
                inode.data.extend_from_slice(&data[..data.len() / 2]);
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            self.inode.lock().unwrap().data.extend_from_slice(data);
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            let mut state = self.dir.state();
            CrashDir::op(&mut state)?;
            state.syncs += 1;
            let mut inode = self.inode.lock().unwrap();
            inode.synced = inode.data.clone();
            Ok(())
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut state = self.dir.state();
            CrashDir::op(&mut state)?;
            self.inode.lock().unwrap().data.truncate(len as usize);
            Ok(())
        }
    }

    impl DataDir for CrashDir {
        fn path(&self) -> &Path {
            Path::new("crash-dir")
        }

        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.names())
        }

        fn read(&self, name: &str) -> io::Result<Vec<u8>> {
            self.contents(name)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        fn create(&self, name: &str) -> io::Result<Box<dyn AppendFile>> {
            let mut state = self.state();
            CrashDir::op(&mut state)?;
            if state.full {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let inode = InodeRef::default();
            state.names.insert(name.to_string(), inode.clone());
            Ok(Box::new(CrashFile {
                dir: self.clone(),
                inode,
            }))
        }

        fn open_append(&self, name: &str) -> io::Result<Box<dyn AppendFile>> {
            let state = self.state();
            let inode = state.names.get(name).cloned();
            let inode = inode.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            Ok(Box::new(CrashFile {
                dir: self.clone(),
                inode,
            }))
        }

        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            let mut state = self.state();
            CrashDir::op(&mut state)?;
            let inode = state.names.remove(from);
            let inode = inode.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            state.names.insert(to.to_string(), inode);
            Ok(())
        }

        fn remove(&self, name: &str) -> io::Result<()> {
            let mut state = self.state();
            CrashDir::op(&mut state)?;
            state.names.remove(name);
            Ok(())
        }

        fn sync(&self) -> io::Result<()> {
            let mut state = self.state();
            CrashDir::op(&mut state)?;
            state.durable_names = state.names.clone();
            Ok(())
        }
    }

    #[test]
    fn a_crash_keeps_what_was_synced_and_the_names_the_directory_sync_saw() {
        let dir = CrashDir::default();
        let mut a = dir.create("a").unwrap();
        a.append(b"synced").unwrap();
        a.sync().unwrap();
        a.append(b" and not").unwrap();
        dir.sync().unwrap();
        let mut b = dir.create("b").unwrap();
        b.append(b"never named durably").unwrap();
        b.sync().unwrap();
        dir.rename("a", "a2").unwrap();
        dir.crash(Tear::Nothing);
        assert_eq!(
            dir.names(),
            ["a"],
            "the rename and b were not synced in the directory"
        );
        assert_eq!(dir.contents("a").unwrap(), b"synced");

        let mut a = dir.open_append("a").unwrap();
        a.append(b"1234").unwrap();
        dir.crash(Tear::Half);
        assert_eq!(dir.contents("a").unwrap(), b"synced12");
        dir.die_after(1);
        let mut a = dir.open_append("a").unwrap();
        a.append(b"x").unwrap();
        assert!(a.sync().is_err(), "dead after one operation");
        dir.crash(Tear::Everything);
        assert_eq!(dir.contents("a").unwrap(), b"synced12x");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FIEMAP`'s flag for an extent whose blocks are not allocated yet: data written and not
    /// yet on its way to the disk.
    const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;

    /// The flags of a file's extents, by `ioctl(FS_IOC_FIEMAP)`; `None` where the file system
    /// does not map extents (tmpfs, say).
    fn extent_flags(file: &Path) -> Option<Vec<u32>> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            extents: [Extent; 32],
        }
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        let f = File::open(file).unwrap();
        // SAFETY: all-zero is a valid Fiemap (plain integers), and the ioctl writes at most
        // `extent_count` extents into the array it is given.
        let mut map: Fiemap = unsafe { std::mem::zeroed() };
        map.length = u64::MAX;
        map.extent_count = 32;
        // SAFETY: FS_IOC_FIEMAP takes a pointer to a `struct fiemap` with room for
        // `extent_count` extents, which `map` is, for as long as the call.
        let done = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, &mut map) };
        if done != 0 {
            return None;
        }
        let n = (map.mapped_extents as usize).min(32);
        Some(map.extents[..n].iter().map(|e| e.flags).collect())
    }

    /// The real file's sync reaches the disk. A crash cannot be staged in a test, but the file
    /// system shows the difference: ext4, xfs and btrfs allocate a written block only when it
    /// is on its way to the disk, and `FIEMAP` marks the extents still waiting
    /// (`DELALLOC`). Where the file system shows no such extents (tmpfs, or delayed
    /// allocation turned off), there is nothing to see, and the test says so.
    #[test]
    fn the_real_files_sync_puts_its_bytes_on_the_disk() {
        // Beside the build, which is on a disk; a temporary dir may be in memory.
        let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&scratch).unwrap();
        let tmp = tempfile::tempdir_in(&scratch).unwrap();
        let dir = OsDir::open(tmp.path()).unwrap();
        let mut file = dir.create("log").unwrap();
        file.append(&vec![7u8; 256 * 1024]).unwrap();
        let path = tmp.path().join("log");
        let before = extent_flags(&path);
        let delayed = |flags: &Option<Vec<u32>>| {
            (flags.iter().flatten()).any(|f| f & FIEMAP_EXTENT_DELALLOC != 0)
        };
        if !delayed(&before) {
            eprintln!(
                "this file system shows no delayed allocation ({before:?}); \
                 the effect of a sync cannot be seen here"
            );
            return;
        }
        file.sync().unwrap();
        let after = extent_flags(&path);
        assert!(
            !delayed(&after),
            "still waiting for the disk after sync: {after:?}"
        );
        assert!(after.is_some_and(|flags| !flags.is_empty()));
    }

    #[test]
    fn a_data_dir_is_locked_while_open() {
        let tmp = tempfile::tempdir().unwrap();
        let first = OsDir::open(tmp.path()).unwrap();
        assert!(matches!(OsDir::open(tmp.path()), Err(Error::Locked(_))));
        drop(first);
        OsDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_truncated_file_appends_from_the_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = OsDir::open(tmp.path()).unwrap();
        let mut file = dir.create("f").unwrap();
        file.append(b"hello world").unwrap();
        file.truncate(5).unwrap();
        file.append(b"!").unwrap();
        drop(file);
        let mut file = dir.open_append("f").unwrap();
        file.append(b"?").unwrap();
        assert_eq!(dir.read("f").unwrap(), b"hello!?");
        dir.rename("f", "g").unwrap();
        dir.sync().unwrap();
        assert_eq!(
            dir.list().unwrap().iter().filter(|n| *n != "LOCK").count(),
            1
        );
        dir.remove("g").unwrap();
        assert!(dir.read("g").is_err());
    }
}

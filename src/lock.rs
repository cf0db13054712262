//! The daemon's claim on its store: `clinicsync run` holds an exclusive advisory
//! lock (flock) on `<store>.lock` for as long as it runs, so a second daemon on the
//! same store refuses to start, `status` can tell a running daemon from a stopped
//! one, and `restore` never swaps a store out from under a running daemon. The
//! kernel drops the lock when the process ends, however it ends (SIGKILL included):
//! a stale lock file means nothing.
//!
//! A daemon that corruption stopped leaves `<store>.stopped` saying why (written by
//! `run` on its way out, 0600): systemd does not restart it, and `status` then shows
//! the reason instead of "not running, start it". The next daemon to take the lock
//! removes the note.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Classify, ErrorClass};

/// The lock file beside a store.
pub fn path_for(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Held by the running daemon; released when dropped or when the process ends.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

/// Why the daemon could not take its store.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock: a second daemon on the same store.
    #[error("another clinicsync daemon is running on this store ({} is locked)", path.display())]
    Held { path: PathBuf },
    /// The lock file could not be opened or locked.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A second daemon is a person's mistake (two units, or `run` by hand beside the
/// service): starting it again meets the same lock, so it is permanent.
impl Classify for LockError {
    fn class(&self) -> ErrorClass {
        match self {
            LockError::Held { .. } => ErrorClass::Permanent,
            LockError::Io { source, .. } => source.class(),
        }
    }
}

/// Takes the store's lock for the daemon, or says who holds it.
pub fn acquire(store: &Path) -> Result<DaemonLock, LockError> {
    let path = path_for(store);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    // SAFETY: flock on a descriptor we own, for the life of `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::Held { path });
        }
        return Err(io_err(e));
    }
    // A daemon runs again: an earlier stop's note is history.
    let _ = std::fs::remove_file(stop_note_path(store));
    use std::io::Write;
    let _ = file.set_len(0);
    let mut f = &file;
    let _ = f.write_all(format!("{}\n", std::process::id()).as_bytes());
    Ok(DaemonLock { _file: file })
}

/// The note beside a store that a daemon stopped by corruption leaves.
pub fn stop_note_path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(".stopped");
    PathBuf::from(p)
}

/// Leaves the note saying why the daemon stopped (one line, replacing any before).
pub fn leave_stop_note(store: &Path, why: &str) -> io::Result<()> {
    use std::io::Write;
    let path = stop_note_path(store);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    let line: String = why.chars().filter(|c| !c.is_control()).take(2000).collect();
    writeln!(f, "{line}")
}

/// Why the daemon stopped, when no daemon runs and the last one left a note.
pub fn stop_note(store: &Path) -> Option<String> {
    if daemon_running(store) {
        return None;
    }
    let text = std::fs::read_to_string(stop_note_path(store)).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Whether a daemon holds the store now (never creates the lock file).
pub fn daemon_running(store: &Path) -> bool {
    let Ok(file) = File::open(path_for(store)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a shared lock taken is released at once.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        return false;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// The pid of the daemon holding the store, as it wrote it into the lock file
/// (`None` when no daemon holds it, or the file does not name one).
pub fn daemon_pid(store: &Path) -> Option<i32> {
    if !daemon_running(store) {
        return None;
    }
    let text = std::fs::read_to_string(path_for(store)).ok()?;
    text.trim().parse().ok().filter(|p: &i32| *p > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_is_refused_permanently_naming_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s.db");
        let held = acquire(&store).unwrap();
        assert!(daemon_running(&store));
        let err = acquire(&store).unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(err.to_string().contains("s.db.lock"), "{err}");
        drop(held);
        assert!(!daemon_running(&store));
        // A stop's note shows while no daemon runs; the next daemon clears it.
        leave_stop_note(
            &store,
            "store corrupt: meta.value of seq holds \"x\"\nsecond",
        )
        .unwrap();
        assert_eq!(
            stop_note(&store).as_deref(),
            Some("store corrupt: meta.value of seq holds \"x\"second")
        );
        let again = acquire(&store).unwrap();
        assert_eq!(stop_note(&store), None);
        drop(again);
        assert_eq!(stop_note(&store), None, "removed, not hidden");
        let io = acquire(&dir.path().join("missing/s.db")).unwrap_err();
        assert!(matches!(io, LockError::Io { .. }), "{io}");
        assert_eq!(io.class(), ErrorClass::Permanent);
    }
}

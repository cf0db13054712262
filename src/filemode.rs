//! File modes for what clinicsync keeps on disk: patient data, keys, credentials.
//!
//! Invariants (Unix modes; the umask can only make them stricter)
//! - The store (`node.store`) is created 0600; SQLite gives its `-wal` and `-shm`
//!   files the mode of the database file, so they are 0600 too. Its directory, when
//!   clinicsync has to create it, is 0750 (the Debian package creates
//!   `/var/lib/clinicsync` 0750 itself). An existing store that others may read
//!   (`o+rwx`) loses those bits when opened; group bits are left as the operator set
//!   them. 0600 rather than 0640: a WAL reader needs write access to `-shm`, so a
//!   read-only group could not use the store anyway.
//! - Secret key files are 0600 and the public key file 0644, in a keys directory
//!   of 0700 ([`crate::keys`]). Bundles are staged for import in a 0700 directory
//!   ([`private_dir`]) in unnamed 0600 files.
//! - A credential file (`parent.token_file`, `mqtt.password_file`,
//!   `emr.credentials_file`) with any group or world permission bits is refused
//!   before it is read ([`check_credential`]), naming the file, its mode and the
//!   fix. Anyone who could read it could act as this node.
//!
//! Errors are `io::Error`s whose message names the file; nothing is half-created
//! except a directory, which is harmless.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of a store file created by clinicsync.
pub const STORE_MODE: u32 = 0o600;
/// Mode of a store directory created by clinicsync.
pub const STORE_DIR_MODE: u32 = 0o750;

/// Refuses a credential file that its group or others may read, write or execute.
pub fn check_credential(path: &Path) -> io::Result<()> {
    let mode = std::fs::metadata(path)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {mode:04o}, so other users may read this credential; \
                 it must be private to the service user: run `chmod 600 {}`",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Writes `contents` to `path` as a private (0600) file, replacing what was there.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only when the file is created; an older file keeps its bits.
    f.set_permissions(Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Creates `dir` (and missing parents) with `mode`, if it does not exist yet; an
/// existing directory is left as it is.
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(mode))
}

/// A directory only this user may enter (0700): created if missing, tightened if
/// not. A symbolic link or a file in its place is refused.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if m.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                create_dir(parent, STORE_DIR_MODE)?;
            }
            DirBuilder::new().mode(0o700).create(dir)?;
            std::fs::set_permissions(dir, Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// A file with no name in `dir`, readable only by this user (0600), gone when it is
/// closed or the process dies: Linux `O_TMPFILE` where the filesystem has it (USB
/// sticks with vfat do not), else a `.tmp<random>` name unlinked at once (a crash in
/// between leaves a `.tmp` file that the next import clears after ten minutes).
pub fn unnamed_file_in(dir: &Path) -> io::Result<std::fs::File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) => {}
        Err(e) => return Err(e),
    }
    loop {
        let name = dir.join(format!(".tmp{:016x}", rand::random::<u64>()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
        {
            Ok(f) => {
                std::fs::remove_file(&name)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Before SQLite opens `path`: creates its directory (0750) and the file (0600) if
/// they do not exist, so SQLite never creates the database, its WAL or its shared
/// memory file with the umask's mode; removes world bits from an existing store.
pub fn prepare_store_file(path: &Path) -> io::Result<()> {
    let s = path.as_os_str();
    if s.is_empty() || s == ":memory:" || s.to_string_lossy().starts_with("file:") {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        create_dir(dir, STORE_DIR_MODE)?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(STORE_MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(Permissions::from_mode(STORE_MODE))?;
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = s.to_owned();
        p.push(suffix);
        let p = Path::new(&p);
        let Ok(m) = std::fs::metadata(p) else {
            continue;
        };
        let mode = m.mode() & 0o7777;
        // Only the owner may change a mode; a technician's read-only look at a
        // store owned by the service user must still work.
        if mode & 0o007 != 0 && m.uid() == euid() {
            std::fs::set_permissions(p, Permissions::from_mode(mode & !0o007))?;
            tracing::warn!(
                file = %p.display(),
                "the store was readable by every user; removed the world permission bits"
            );
        }
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The permission bits of `path` (tests and `doctor`).
pub fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(std::fs::metadata(path)?.mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_readable_by_others_is_refused_naming_file_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("parent.token");
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        let err = check_credential(&p).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains("0644"), "{err}");
        assert!(err.contains(&format!("chmod 600 {}", p.display())), "{err}");
        std::fs::set_permissions(&p, Permissions::from_mode(0o640)).unwrap();
        assert!(check_credential(&p).is_err(), "group bits are refused too");
        std::fs::set_permissions(&p, Permissions::from_mode(0o600)).unwrap();
        check_credential(&p).unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o400)).unwrap();
        check_credential(&p).unwrap();
    }

    #[test]
    fn write_private_tightens_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, Permissions::from_mode(0o666)).unwrap();
        write_private(&p, b"new").unwrap();
        assert_eq!(mode_of(&p).unwrap(), 0o600);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
    }

    #[test]
    fn private_dir_is_created_0700_and_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/private");
        private_dir(&p).unwrap();
        assert_eq!(mode_of(&p).unwrap(), 0o700);
        assert_eq!(mode_of(&dir.path().join("a")).unwrap(), 0o750);
        std::fs::set_permissions(&p, Permissions::from_mode(0o755)).unwrap();
        private_dir(&p).unwrap();
        assert_eq!(mode_of(&p).unwrap(), 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(
            private_dir(&link).is_err(),
            "a symlink is not our directory"
        );
    }
}

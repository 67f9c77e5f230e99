use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore as _};

use crate::error::KeyError;

/// Replaces `path` with `bytes` so that a reader (or a crash) sees either the old
/// contents or the new, never a mix, and the file never exists with wider permissions
/// than `mode`.
///
/// Writes a temporary file in the same directory (so the rename cannot cross
/// filesystems), created with `O_CREAT|O_EXCL` and `mode` given to `open(2)`, fsyncs it,
/// renames it over `path` and fsyncs the directory so the rename itself survives a power
/// cut. On any error the temporary file is removed and `path` is left as it was.
///
/// `mode` is exact: if the umask stripped bits from it at creation, they are restored
/// with `fchmod` on the still-empty file. That can only widen the file up to `mode`,
/// before any byte is written, so nothing is ever readable beyond what was asked for.
/// A symlink at `path` is replaced, not followed.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let path = path.as_ref();
    let dir = parent_dir(path);
    let Some(name) = path.file_name() else {
        return Err(KeyError::io(
            "write",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        ));
    };
    let (tmp_path, mut file) = create_temp(dir, name.to_owned(), mode)?;
    let guard = TempFile(Some(tmp_path.clone()));
    let tmp_path = tmp_path.as_path();

    let created_mode = file
        .metadata()
        .map_err(|e| KeyError::io("stat temporary file", tmp_path, e))?
        .mode()
        & 0o7777;
    if created_mode != mode & 0o7777 {
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| KeyError::io("set the mode of temporary file", tmp_path, e))?;
    }
    file.write_all(bytes)
        .map_err(|e| KeyError::io("write temporary file", tmp_path, e))?;
    file.sync_all()
        .map_err(|e| KeyError::io("fsync temporary file", tmp_path, e))?;
    drop(file);
    fs::rename(tmp_path, path)
        .map_err(|e| KeyError::io("rename a temporary file over", path, e))?;
    guard.keep();
    fsync_dir(dir)
}

/// The directory holding `path`; `.` for a bare file name.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn create_temp(dir: &Path, name: OsString, mode: u32) -> Result<(PathBuf, File), KeyError> {
    // A random suffix rather than only the pid: two threads of one process may write the
    // same file, and a stale temp left by a crash must not block the next write.
    let mut attempts = 0;
    loop {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(&name);
        tmp_name.push(format!(
            ".{}.{:016x}.tmp",
            std::process::id(),
            OsRng.next_u64()
        ));
        let tmp_path = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp_path)
        {
            Ok(file) => return Ok((tmp_path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
            Err(e) => return Err(KeyError::io("create a temporary file in", dir, e)),
        }
    }
}

/// Removes the temporary file unless it was renamed into place, including on panic.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // Best effort: the original error is what the caller needs to see.
            let _ = fs::remove_file(path);
        }
    }
}

/// Makes a rename or unlink in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| KeyError::io("fsync directory", dir, e))
}

/// Overwrites the contents of an already-unlinked key file with zeros and flushes them.
///
/// This shortens the life of the old key on disk on plain filesystems; on copy-on-write
/// filesystems and SSDs the old blocks may survive anyway, which is why the key
/// directory should live on an encrypted or tmpfs-backed volume if that matters.
/// Does nothing if the inode is still reachable under another name (a hard link): that
/// copy is somebody's deliberate backup, and zeroing it would destroy it.
pub(crate) fn scrub_unlinked(file: &File, path: &Path) -> Result<(), KeyError> {
    let meta = file
        .metadata()
        .map_err(|e| KeyError::io("stat old key file", path, e))?;
    if !meta.is_file() || meta.nlink() != 0 {
        return Ok(());
    }
    let zeros = [0u8; 4096];
    let mut offset = 0u64;
    while offset < meta.len() {
        let n = usize::try_from((meta.len() - offset).min(zeros.len() as u64)).unwrap_or(0);
        file.write_all_at(&zeros[..n], offset)
            .map_err(|e| KeyError::io("overwrite old key file", path, e))?;
        offset += n as u64;
    }
    file.sync_data()
        .map_err(|e| KeyError::io("fsync old key file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{entry_names as entries, mode_of};

    #[test]
    fn writes_the_content_with_the_requested_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"hello\n", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello\n");
        assert_eq!(mode_of(&path), 0o600);

        let public = dir.path().join("g");
        write_atomic(&public, b"x", 0o644).unwrap();
        assert_eq!(mode_of(&public), 0o644);
    }

    #[test]
    fn leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(entries(dir.path()), ["f"]);
    }

    #[test]
    fn replaces_an_existing_file_with_a_new_inode_and_the_new_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old contents that are longer").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let old_ino = fs::metadata(&path).unwrap().ino();
        // A reader holding the old file keeps seeing the complete old contents.
        let reader = File::open(&path).unwrap();

        write_atomic(&path, b"new", 0o600).unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o600);
        assert_ne!(fs::metadata(&path).unwrap().ino(), old_ino);
        let mut buf = vec![0u8; 64];
        let n = reader.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"old contents that are longer");
    }

    #[test]
    fn failed_rename_removes_the_temporary_file_and_keeps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"keep me").unwrap();

        let err = write_atomic(&target, b"data", 0o600).unwrap_err();

        assert!(matches!(err, KeyError::Io { .. }), "{err}");
        assert!(err.to_string().contains("target"), "{err}");
        assert_eq!(entries(dir.path()), ["target"]);
        assert_eq!(fs::read(target.join("inside")).unwrap(), b"keep me");
    }

    #[test]
    fn missing_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("f");
        let err = write_atomic(&path, b"data", 0o600).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"untouched").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();

        write_atomic(&link, b"new", 0o600).unwrap();

        assert!(fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(fs::read(&link).unwrap(), b"new");
        assert_eq!(fs::read(&elsewhere).unwrap(), b"untouched");
    }

    #[test]
    fn bare_file_names_are_written_relative_to_the_current_directory() {
        assert_eq!(parent_dir(Path::new("f")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/f")), Path::new("/a"));
    }

    #[test]
    fn scrub_zeroes_an_unlinked_file_but_not_a_hard_linked_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.key");
        fs::write(&path, b"secret secret secret\n").unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();

        let backup = dir.path().join("backup");
        fs::hard_link(&path, &backup).unwrap();
        fs::remove_file(&path).unwrap();
        scrub_unlinked(&file, &path).unwrap();
        assert_eq!(fs::read(&backup).unwrap(), b"secret secret secret\n");

        fs::remove_file(&backup).unwrap();
        scrub_unlinked(&file, &path).unwrap();
        let mut buf = vec![0xffu8; 21];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0u8; 21]);
    }
}

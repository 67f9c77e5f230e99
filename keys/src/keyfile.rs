//! Reading private key files with the checks `wg` itself does not make.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::KeyError;
use crate::ownership::{check_links, check_owner};
use crate::private::PrivateKey;

/// A valid key file is 45 bytes; anything much longer is not a key, and reading it
/// whole would only copy more of whatever it is into memory.
const MAX_KEY_FILE_LEN: usize = 128;

pub(crate) struct LoadedKey {
    pub key: PrivateKey,
    /// Modification time, unix seconds: the fallback timestamp when the state file does
    /// not know this key.
    pub modified: u64,
}

/// Reads a private key file; `Ok(None)` if it does not exist.
///
/// Refuses symlinks, non-regular files, files group or others can access, files another
/// user owns and files with a second name: a key that others could read must be treated
/// as leaked, so we stop rather than run with it.
pub(crate) fn read_key_file(path: &Path) -> Result<Option<LoadedKey>, KeyError> {
    // lstat first so that opening a FIFO or device never happens; the checks are repeated
    // on the open descriptor below, which is what closes the race.
    match fs::symlink_metadata(path) {
        Ok(meta) => check_type(path, meta.file_type())?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyError::io("stat", path, e)),
    }
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_regular(path, "a symbolic link"));
        }
        Err(e) => return Err(KeyError::io("open", path, e)),
    };
    let meta = file.metadata().map_err(|e| KeyError::io("stat", path, e))?;
    check_type(path, meta.file_type())?;
    check_owner(path, "private key file", &meta)?;
    check_links(path, &meta)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecureKeyFile {
            path: path.to_owned(),
            mode,
        });
    }
    let key = parse(path, &mut file)?;
    Ok(Some(LoadedKey {
        key,
        modified: u64::try_from(meta.mtime()).unwrap_or(0),
    }))
}

fn parse(path: &Path, file: &mut File) -> Result<PrivateKey, KeyError> {
    let invalid = |reason: &str| KeyError::InvalidKey {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    // Fixed-size zeroizing buffer: a growing Vec would leave copies of the key behind
    // in freed memory as it reallocates.
    let mut buf = Zeroizing::new([0u8; MAX_KEY_FILE_LEN + 1]);
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len > MAX_KEY_FILE_LEN {
                    return Err(invalid("the file is far longer than a key"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KeyError::io("read", path, e)),
        }
    }
    if len == 0 {
        return Err(invalid("the file is empty"));
    }
    let Ok(text) = std::str::from_utf8(&buf[..len]) else {
        return Err(invalid("the file is not text"));
    };
    PrivateKey::from_base64(text).map_err(|e| invalid(&e.to_string()))
}

fn check_type(path: &Path, file_type: FileType) -> Result<(), KeyError> {
    if file_type.is_file() {
        return Ok(());
    }
    let kind = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a named pipe"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(not_regular(path, kind))
}

fn not_regular(path: &Path, kind: &'static str) -> KeyError {
    KeyError::NotRegularFile {
        path: path.to_owned(),
        kind,
    }
}

/// Opens an existing key file for [`crate::atomic::scrub_unlinked`]; `None` if there is
/// nothing suitable to scrub. Scrubbing is best effort, so failures are not errors.
pub(crate) fn open_for_scrub(path: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;
    use std::os::unix::fs::PermissionsExt as _;

    use crate::atomic::write_atomic;

    fn key_file(dir: &Path, mode: u32) -> (std::path::PathBuf, PrivateKey) {
        let path = dir.join("private.key");
        let key = PrivateKey::generate();
        write_atomic(&path, &key.to_file_contents(), mode).unwrap();
        (path, key)
    }

    #[test]
    fn reads_a_0600_key_file_written_like_wg_genkey() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = key_file(dir.path(), 0o600);
        let loaded = read_key_file(&path).unwrap().unwrap();
        assert_eq!(loaded.key.public_key(), key.public_key());
        assert!(loaded.modified > 0);
    }

    #[test]
    fn owner_read_only_0400_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = key_file(dir.path(), 0o400);
        assert!(read_key_file(&path).unwrap().is_some());
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_key_file(&dir.path().join("nope")).unwrap().is_none());
    }

    #[test]
    fn group_or_other_access_is_refused_naming_file_mode_and_chmod_600() {
        for mode in [0o640, 0o604, 0o620, 0o660, 0o644, 0o601] {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = key_file(dir.path(), 0o600);
            fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            let err = read_key_file(&path).err().unwrap();
            let msg = err.to_string();
            assert!(
                matches!(err, KeyError::InsecureKeyFile { mode: m, .. } if m == mode),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
        }
    }

    #[test]
    fn non_regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("adir");
        fs::create_dir(&sub).unwrap();
        let err = read_key_file(&sub).err().unwrap();
        assert!(
            matches!(
                err,
                KeyError::NotRegularFile {
                    kind: "a directory",
                    ..
                }
            ),
            "{err}"
        );

        let (real, _) = key_file(dir.path(), 0o600);
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = read_key_file(&link).err().unwrap();
        assert!(
            matches!(
                err,
                KeyError::NotRegularFile {
                    kind: "a symbolic link",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("link.key"), "{err}");
    }

    #[test]
    fn invalid_contents_name_the_file_and_never_echo_the_content() {
        let cases: [&[u8]; 5] = [
            b"",
            b"c2VjcmV0LW5vdC1hLWtleQ==\n",
            b"\xff\xfe secret bytes",
            b"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LC?=\n",
            &[b'A'; 300],
        ];
        for content in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("private.key");
            write_atomic(&path, content, 0o600).unwrap();
            let err = read_key_file(&path).err().unwrap();
            let msg = err.to_string();
            assert!(matches!(err, KeyError::InvalidKey { .. }), "{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            for secret in ["c2VjcmV0", "secret", "dwdt", "?", "AAAAAAAA"] {
                assert!(!msg.contains(secret), "echoes {secret:?}: {msg}");
            }
        }
    }

    #[test]
    fn scrub_handle_is_only_for_existing_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_for_scrub(&dir.path().join("nope")).is_none());
        let (path, _) = key_file(dir.path(), 0o600);
        assert!(open_for_scrub(&path).is_some());
    }
}

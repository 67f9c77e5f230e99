//! Who may have touched a key: the owner and link checks that a mode check alone misses.
//!
//! A key file or directory of mode 0600/0700 that belongs to another user is that
//! user's to read and replace; a second hard link to a key file is a name the key can be
//! read or kept through after we wipe ours; and a key directory is only as safe as the
//! directories above it (anyone who can rename entries in an ancestor can swap the whole
//! directory for one of theirs). The rules are OpenSSH's for its key files
//! (`safe_path()` in misc.c): every ancestor owned by root or by us, and writable by
//! nobody else unless it is sticky (as `/tmp` is), where others cannot rename what is
//! ours.
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use crate::error::KeyError;

/// The user this process acts as: the only owner a key may have.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses `meta` (of `path`, a key file or the key directory) unless this user owns it.
pub(crate) fn check_owner(
    path: &Path,
    what: &'static str,
    meta: &Metadata,
) -> Result<(), KeyError> {
    let (owner, euid) = (meta.uid(), euid());
    if owner == euid {
        return Ok(());
    }
    Err(KeyError::ForeignOwner {
        path: path.to_owned(),
        what,
        owner,
        euid,
    })
}

/// Refuses a key file with more than one name.
pub(crate) fn check_links(path: &Path, meta: &Metadata) -> Result<(), KeyError> {
    match meta.nlink() {
        1 => Ok(()),
        links => Err(KeyError::HardLinked {
            path: path.to_owned(),
            links,
        }),
    }
}

/// Refuses the key directory `dir` if any directory above it lets someone other than
/// root or this user rename its entries.
pub(crate) fn check_ancestors(dir: &Path) -> Result<(), KeyError> {
    let real = fs::canonicalize(dir).map_err(|e| KeyError::io("resolve", dir, e))?;
    let euid = euid();
    for ancestor in real.ancestors().skip(1) {
        let meta = fs::metadata(ancestor).map_err(|e| KeyError::io("stat", ancestor, e))?;
        let mode = meta.mode() & 0o7777;
        let reason = if meta.uid() != 0 && meta.uid() != euid {
            format!("it is owned by uid {}", meta.uid())
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            format!("it has mode {mode:04o}: group or others can rename what is in it")
        } else {
            continue;
        };
        return Err(KeyError::UnsafeAncestor {
            path: dir.to_owned(),
            ancestor: ancestor.to_owned(),
            reason,
        });
    }
    Ok(())
}

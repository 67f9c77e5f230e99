use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use crate::atomic::{fsync_dir, parent_dir, scrub_unlinked, write_atomic};
use crate::error::KeyError;
use crate::keyfile::{LoadedKey, open_for_scrub, read_key_file};
use crate::ownership::{check_ancestors, check_owner};
use crate::private::PrivateKey;
use crate::public::PublicKey;
use crate::state::{
    KeyRecord, KeyState, PreviousKeyRecord, read_state, reconcile, unix_now, write_state,
};

/// Where the node config points by default.
pub const DEFAULT_KEY_DIR: &str = "/var/lib/flynode/keys";
/// The current private key: base64 + newline, mode 0600 (`wg genkey` format).
pub const PRIVATE_KEY_FILE: &str = "private.key";
/// The key retired by the last rotation, kept for its grace period; same format.
pub const PREVIOUS_KEY_FILE: &str = "previous.key";
/// Public keys, timestamps and the generation counter (JSON); no key material.
pub const STATE_FILE: &str = "state.json";

const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;
// Only public data, but the directory is 0700 anyway, so wider would buy nothing.
const STATE_MODE: u32 = 0o600;

/// The node's key directory.
///
/// Mutating operations take an exclusive `flock` on the directory, so two `flynode keys`
/// invocations cannot interleave a rotation. Loading keys takes no lock: every file is
/// replaced by an atomic rename, so a reader always sees a whole key.
#[derive(Debug, Clone)]
pub struct KeyDir {
    path: PathBuf,
}

/// The outcome of [`KeyDir::rotate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The key that was current and is now in `previous.key`.
    pub old: PublicKey,
    /// The new current key.
    pub new: PublicKey,
    pub rotated_at: u64,
    /// The generation of the new key.
    pub generation: u64,
    /// The key that was in its grace period and has been wiped to make room, if any.
    pub wiped: Option<PublicKey>,
}

impl KeyDir {
    /// Opens the key directory, creating it (and missing parents) with mode 0700.
    ///
    /// An existing directory is used as is, but one that gives group or others any
    /// access is refused rather than silently fixed: whoever loosened it may have read
    /// the keys, and the operator needs to know.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        match fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(path)
                    .map_err(|e| KeyError::io("create key directory", path, e))?;
                fsync_dir(parent_dir(path))?;
            }
            Err(e) => return Err(KeyError::io("stat key directory", path, e)),
        }
        Self::open(path)
    }

    /// Opens an existing key directory; same permission check as [`KeyDir::create`], and
    /// the directory must be ours, not a symbolic link, and in ancestors only root or we
    /// can change (see `ownership`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::DirMissing {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(KeyError::io("stat key directory", path, e)),
        };
        if meta.file_type().is_symlink() {
            return Err(KeyError::SymlinkedDir {
                path: path.to_owned(),
            });
        }
        if !meta.is_dir() {
            return Err(KeyError::NotADirectory {
                path: path.to_owned(),
            });
        }
        check_owner(path, "key directory", &meta)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::InsecureDir {
                path: path.to_owned(),
                mode,
            });
        }
        check_ancestors(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn private_key_path(&self) -> PathBuf {
        self.path.join(PRIVATE_KEY_FILE)
    }

    pub fn previous_key_path(&self) -> PathBuf {
        self.path.join(PREVIOUS_KEY_FILE)
    }

    pub fn state_path(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// Creates the node's private key and returns its public key.
    ///
    /// An existing key is never replaced unless `force` is set, since replacing it cuts
    /// the node off from every peer that knows the old public key. With `force`, a
    /// broken or insecure current key file is replaced too (that is what `--force` is
    /// for); a previous key still in its grace period is left alone.
    pub fn generate(&self, force: bool) -> Result<PublicKey, KeyError> {
        let _lock = self.lock(true)?;
        let private_path = self.private_key_path();
        let exists = match fs::symlink_metadata(&private_path) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(KeyError::io("stat", &private_path, e)),
        };
        if exists && !force {
            return Err(KeyError::KeyExists { path: private_path });
        }
        let recorded = read_state(&self.state_path())?;
        let replaced = match read_key_file(&private_path) {
            Ok(loaded) => loaded.map(|l| identity(&l)),
            Err(_) if force => None,
            Err(e) => return Err(e),
        };
        let previous = read_key_file(&self.previous_key_path())?.map(|l| identity(&l));
        let before = reconcile(recorded.as_ref(), replaced, previous);

        let key = PrivateKey::generate();
        write_atomic(&private_path, &key.to_file_contents(), KEY_MODE)?;
        let public_key = key.public_key();
        let state = KeyState {
            generation: before.generation + 1,
            current: Some(KeyRecord {
                public_key,
                created_at: unix_now(),
            }),
            previous: before.previous,
        };
        write_state(&self.state_path(), &state, STATE_MODE)?;
        Ok(public_key)
    }

    /// The current private key; an error if there is none.
    pub fn load_current(&self) -> Result<PrivateKey, KeyError> {
        let path = self.private_key_path();
        match read_key_file(&path)? {
            Some(loaded) => Ok(loaded.key),
            None => Err(KeyError::NoCurrentKey { path }),
        }
    }

    /// The previous private key, if a rotation's grace period is in progress.
    pub fn load_previous(&self) -> Result<Option<PrivateKey>, KeyError> {
        Ok(read_key_file(&self.previous_key_path())?.map(|l| l.key))
    }

    /// Retires the current key to `previous.key` and makes a new current key.
    ///
    /// Peers that still only know the old public key keep working while `previous.key`
    /// exists; call [`KeyDir::wipe_previous`] once they have all been updated.
    ///
    /// There is only one grace slot: rotating again while a previous key still exists
    /// replaces it, and that oldest key is wiped (its file zeroed once no name refers to
    /// it), so peers still on it are cut off. [`Rotation::wiped`] reports it.
    ///
    /// Files are written in the order previous, current, state, each atomically, so a
    /// crash at any point leaves a loadable current key and never loses the key peers
    /// are using; [`KeyDir::state`] repairs the timestamps of an interrupted rotation.
    pub fn rotate(&self) -> Result<Rotation, KeyError> {
        let _lock = self.lock(true)?;
        let private_path = self.private_key_path();
        let previous_path = self.previous_key_path();
        let Some(current) = read_key_file(&private_path)? else {
            return Err(KeyError::NoCurrentKey { path: private_path });
        };
        let previous = read_key_file(&previous_path)?;
        let recorded = read_state(&self.state_path())?;
        let before = reconcile(
            recorded.as_ref(),
            Some(identity(&current)),
            previous.as_ref().map(identity),
        );
        let old = current.key.public_key();
        let old_created_at = before.current.map_or(current.modified, |r| r.created_at);
        // Held open so the oldest key's blocks can be zeroed after the rename unlinks it.
        let oldest_file = previous
            .as_ref()
            .and_then(|_| open_for_scrub(&previous_path));

        write_atomic(&previous_path, &current.key.to_file_contents(), KEY_MODE)?;
        let key = PrivateKey::generate();
        write_atomic(&private_path, &key.to_file_contents(), KEY_MODE)?;
        let rotated_at = unix_now();
        let new = key.public_key();
        let generation = before.generation + 1;
        let state = KeyState {
            generation,
            current: Some(KeyRecord {
                public_key: new,
                created_at: rotated_at,
            }),
            previous: Some(PreviousKeyRecord {
                public_key: old,
                created_at: old_created_at,
                rotated_at,
            }),
        };
        write_state(&self.state_path(), &state, STATE_MODE)?;
        if let Some(file) = oldest_file {
            // Best effort: the rotation itself has succeeded and is durable.
            let _ = scrub_unlinked(&file, &previous_path);
        }
        Ok(Rotation {
            old,
            new,
            rotated_at,
            generation,
            // An interrupted earlier rotation can leave a copy of the current key there.
            wiped: previous.map(|p| p.key.public_key()).filter(|p| *p != old),
        })
    }

    /// Ends a rotation's grace period: removes `previous.key` and drops it from the state
    /// file. Returns the removed key's public key (`None` if there was no previous key,
    /// or it was unreadable, which does not stop it being removed).
    ///
    /// The file is unlinked first and its contents then overwritten with zeros through a
    /// descriptor held open, so a crash can never leave a zeroed `previous.key` behind.
    pub fn wipe_previous(&self) -> Result<Option<PublicKey>, KeyError> {
        let _lock = self.lock(true)?;
        let path = self.previous_key_path();
        let state_path = self.state_path();
        let recorded = read_state(&state_path)?;
        let exists = match fs::symlink_metadata(&path) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(KeyError::io("stat", &path, e)),
        };
        let mut wiped = None;
        if exists {
            wiped = read_key_file(&path)
                .ok()
                .flatten()
                .map(|l| l.key.public_key());
            let file = open_for_scrub(&path);
            fs::remove_file(&path).map_err(|e| KeyError::io("remove", &path, e))?;
            fsync_dir(&self.path)?;
            if let Some(file) = file {
                // Best effort: the key is already gone from the directory.
                let _ = scrub_unlinked(&file, &path);
            }
        }
        if let Some(mut state) = recorded.filter(|s| s.previous.is_some()) {
            state.previous = None;
            write_state(&state_path, &state, STATE_MODE)?;
        }
        Ok(wiped)
    }

    /// Public keys and timestamps of the current and previous keys.
    ///
    /// Derived from the key files themselves, with timestamps from the state file (see
    /// [`KeyState`]); a key the state file does not know, e.g. one installed with
    /// `wg genkey > private.key`, gets its file's modification time. Reads the private
    /// keys, so it reports the same permission problems loading them would.
    pub fn state(&self) -> Result<KeyState, KeyError> {
        let _lock = self.lock(false)?;
        let recorded = read_state(&self.state_path())?;
        let current = read_key_file(&self.private_key_path())?;
        let previous = read_key_file(&self.previous_key_path())?;
        Ok(reconcile(
            recorded.as_ref(),
            current.as_ref().map(identity),
            previous.as_ref().map(identity),
        ))
    }

    fn lock(&self, exclusive: bool) -> Result<File, KeyError> {
        let dir = File::open(&self.path)
            .map_err(|e| KeyError::io("open key directory", &self.path, e))?;
        let locked = if exclusive {
            dir.lock()
        } else {
            dir.lock_shared()
        };
        locked.map_err(|e| KeyError::io("lock key directory", &self.path, e))?;
        Ok(dir)
    }
}

fn identity(loaded: &LoadedKey) -> (PublicKey, u64) {
    (loaded.key.public_key(), loaded.modified)
}

#[cfg(test)]
#[path = "keydir_tests.rs"]
mod tests;

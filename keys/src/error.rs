use std::io;
use std::path::PathBuf;

/// Everything that can go wrong with the key directory. Every message names the file and
/// says what the operator should do; none of them ever contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "key directory {path} does not exist; generate a key first (`flynode keys generate`) \
         or check the keys path in the node config"
    )]
    DirMissing { path: PathBuf },

    #[error("key directory {path} is not a directory; move it aside and generate a key")]
    NotADirectory { path: PathBuf },

    #[error(
        "key directory {path} has mode {mode:04o}, which gives group or others access; \
         fix it with `chmod 700 {path}`"
    )]
    InsecureDir { path: PathBuf, mode: u32 },

    #[error(
        "key directory {path} is a symbolic link; point the config's key_dir at the real \
         directory (a link can be re-pointed by whoever owns the directory it is in)"
    )]
    SymlinkedDir { path: PathBuf },

    #[error(
        "{what} {path} belongs to uid {owner}, not to uid {euid} that flynode runs as; \
         that user can read or replace the key: `chown {euid} {path}` if it is yours, \
         and rotate the key if anyone else may have had it"
    )]
    ForeignOwner {
        path: PathBuf,
        what: &'static str,
        owner: u32,
        euid: u32,
    },

    #[error(
        "private key file {path} has {links} names (hard links); the key can be read through \
         the others, and survives our wiping it: remove the other links (`find / -samefile \
         {path}`) and rotate the key"
    )]
    HardLinked { path: PathBuf, links: u64 },

    #[error(
        "key directory {path} is not safe: {ancestor} above it is not ({reason}), so it \
         can be swapped for another directory; move the keys to a directory whose \
         ancestors only root (or this user) can change, such as /var/lib/flynode/keys"
    )]
    UnsafeAncestor {
        path: PathBuf,
        ancestor: PathBuf,
        reason: String,
    },

    #[error(
        "private key file {path} has mode {mode:04o}, readable by group or others; \
         fix it with `chmod 600 {path}` (and rotate the key if anyone else may have read it)"
    )]
    InsecureKeyFile { path: PathBuf, mode: u32 },

    #[error(
        "{path} is {kind}, not a regular file; replace it with a key file \
         (`flynode keys generate --force`, or `wg genkey > {path}` with mode 0600)"
    )]
    NotRegularFile { path: PathBuf, kind: &'static str },

    #[error(
        "{path} does not hold a valid private key ({reason}); it must contain one base64 key \
         as printed by `wg genkey`: restore it from backup or replace it with \
         `flynode keys generate --force`"
    )]
    InvalidKey { path: PathBuf, reason: String },

    #[error(
        "{path} already exists; pass --force to replace it. Replacing it changes this \
         node's public key, which breaks peers configured with the old one until they are \
         updated (`flynode keys rotate` keeps the old key for a grace period instead)"
    )]
    KeyExists { path: PathBuf },

    #[error("no private key at {path}; create one with `flynode keys generate`")]
    NoCurrentKey { path: PathBuf },

    #[error(
        "state file {path} is unusable ({reason}); it holds only public keys and timestamps, \
         so it is safe to move it aside: it is rebuilt from the key files, with timestamps \
         taken from their modification times"
    )]
    InvalidState { path: PathBuf, reason: String },
}

impl KeyError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

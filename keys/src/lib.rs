//! flynode node keys.
//!
//! - [`PrivateKey`] / [`PublicKey`]: x25519 keys in exactly the format `wg genkey` and
//!   `wg pubkey` use (standard base64 with padding, 44 characters), so keys can be moved
//!   between flynode and wireguard-tools freely.
//! - [`KeyDir`]: the node's key directory (default [`DEFAULT_KEY_DIR`], mode 0700) with
//!   [`PRIVATE_KEY_FILE`], [`PREVIOUS_KEY_FILE`] (only during a rotation's grace period)
//!   and [`STATE_FILE`] (public keys and timestamps), rotation and wiping.
//! - [`forbid_core_dumps`]: what every process that holds a key calls first.
//! - [`write_atomic`]: the crash-safe, permission-safe file replacement everything here
//!   is written with.

mod atomic;
mod error;
mod keydir;
mod keyfile;
mod ownership;
mod private;
mod process;
mod public;
mod state;
#[cfg(test)]
mod test_util;

pub use atomic::write_atomic;
pub use error::KeyError;
pub use keydir::{
    DEFAULT_KEY_DIR, KeyDir, PREVIOUS_KEY_FILE, PRIVATE_KEY_FILE, Rotation, STATE_FILE,
};
pub use private::{KEY_BASE64_LEN, PrivateKey};
pub use process::forbid_core_dumps;
pub use public::{FINGERPRINT_LEN, KeyParseError, PublicKey};
pub use state::{KeyRecord, KeyState, PreviousKeyRecord, rfc3339_utc, unix_now};

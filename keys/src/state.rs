//! The state file: public keys and timestamps only, never key material.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::error::KeyError;
use crate::public::PublicKey;

/// The on-disk format version this build writes and the newest it reads.
const FORMAT_VERSION: u32 = 1;

/// Nothing legitimate comes close; refusing more keeps a corrupted file from being
/// read whole into memory.
const MAX_STATE_FILE_LEN: u64 = 64 * 1024;

/// What the key directory holds, as reported by [`crate::KeyDir::state`].
/// Timestamps are unix seconds (UTC); render them with [`rfc3339_utc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// Incremented each time a new current key is made (generate or rotate); 0 before
    /// the first key.
    pub generation: u64,
    #[serde(default)]
    pub current: Option<KeyRecord>,
    /// The key retired by the last rotation, while its grace period lasts.
    #[serde(default)]
    pub previous: Option<PreviousKeyRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub public_key: PublicKey,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousKeyRecord {
    pub public_key: PublicKey,
    pub created_at: u64,
    /// When it stopped being the current key.
    pub rotated_at: u64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(flatten)]
    state: KeyState,
}

impl KeyState {
    fn created_at_of(&self, key: PublicKey) -> Option<u64> {
        let current = self.current.as_ref().filter(|r| r.public_key == key);
        let previous = self.previous.as_ref().filter(|r| r.public_key == key);
        current
            .map(|r| r.created_at)
            .or(previous.map(|r| r.created_at))
    }
}

/// Reads the state file; `Ok(None)` if there is none yet.
pub(crate) fn read_state(path: &Path) -> Result<Option<KeyState>, KeyError> {
    let invalid = |reason: String| KeyError::InvalidState {
        path: path.to_owned(),
        reason,
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyError::io("stat", path, e)),
    };
    if !meta.is_file() {
        return Err(invalid("not a regular file".to_owned()));
    }
    if meta.len() > MAX_STATE_FILE_LEN {
        return Err(invalid(format!("{} bytes, too large", meta.len())));
    }
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(KeyError::io("read", path, e)),
    };
    let file: StateFile =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    if file.version > FORMAT_VERSION {
        return Err(invalid(format!(
            "format version {} is newer than this flynode understands ({FORMAT_VERSION})",
            file.version
        )));
    }
    Ok(Some(file.state))
}

pub(crate) fn write_state(path: &Path, state: &KeyState, mode: u32) -> Result<(), KeyError> {
    let file = StateFile {
        version: FORMAT_VERSION,
        state: state.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::InvalidState {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, mode)
}

/// The key files are the truth; the state file only adds timestamps to them.
///
/// They disagree after a crash part way through a rotation (the key files are written
/// first, the state file last), when a key was put in place by hand (`wg genkey >
/// private.key`) or when the state file was deleted. Timestamps the state file does not
/// have for a key fall back to the key file's modification time, which is when that key
/// was installed. `current`/`previous` are (public key, key file mtime).
pub(crate) fn reconcile(
    recorded: Option<&KeyState>,
    current: Option<(PublicKey, u64)>,
    previous: Option<(PublicKey, u64)>,
) -> KeyState {
    let empty = KeyState {
        generation: 0,
        current: None,
        previous: None,
    };
    let recorded = recorded.unwrap_or(&empty);
    let recorded_current = recorded.current.as_ref().map(|r| r.public_key);
    let generation = match current {
        Some((key, _)) if Some(key) != recorded_current => recorded.generation + 1,
        _ => recorded.generation,
    };
    let previous = previous.map(|(key, mtime)| {
        let rotated_at = match &recorded.previous {
            Some(r) if r.public_key == key => r.rotated_at,
            // Crashed after moving the current key aside: it was retired when the new
            // current key file was written.
            _ if recorded_current == Some(key) => current.map_or(mtime, |(_, m)| m),
            _ => mtime,
        };
        PreviousKeyRecord {
            public_key: key,
            created_at: recorded.created_at_of(key).unwrap_or(mtime),
            rotated_at,
        }
    });
    let current = current.map(|(key, mtime)| KeyRecord {
        public_key: key,
        created_at: recorded.created_at_of(key).unwrap_or(mtime),
    });
    KeyState {
        generation,
        current,
        previous,
    }
}

/// Seconds since the unix epoch; 0 if the clock is set before 1970.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Renders unix seconds as RFC 3339 in UTC, e.g. `2023-11-14T22:13:20Z`.
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard
/// Hinnant's `civil_from_days`; small enough not to justify a date crate.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::private::PrivateKey;

    fn pk() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn rfc3339_renders_known_instants_in_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339_utc(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn state_file_round_trips_and_carries_a_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = KeyState {
            generation: 2,
            current: Some(KeyRecord {
                public_key: pk(),
                created_at: 20,
            }),
            previous: Some(PreviousKeyRecord {
                public_key: pk(),
                created_at: 10,
                rotated_at: 20,
            }),
        };
        write_state(&path, &state, 0o600).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(state));
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn missing_state_file_is_none_and_garbage_is_an_error_saying_it_can_be_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(read_state(&path).unwrap(), None);
        fs::write(&path, b"{not json").unwrap();
        let msg = read_state(&path).unwrap_err().to_string();
        assert!(
            msg.contains("state.json") && msg.contains("move it aside"),
            "{msg}"
        );
    }

    #[test]
    fn newer_format_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"version": 2, "generation": 1}"#).unwrap();
        let msg = read_state(&path).unwrap_err().to_string();
        assert!(msg.contains("version 2"), "{msg}");
    }

    #[test]
    fn reconcile_keeps_recorded_timestamps_for_matching_keys() {
        let (a, b) = (pk(), pk());
        let recorded = KeyState {
            generation: 5,
            current: Some(KeyRecord {
                public_key: b,
                created_at: 200,
            }),
            previous: Some(PreviousKeyRecord {
                public_key: a,
                created_at: 100,
                rotated_at: 200,
            }),
        };
        let got = reconcile(Some(&recorded), Some((b, 999)), Some((a, 999)));
        assert_eq!(got, recorded);
    }

    #[test]
    fn reconcile_falls_back_to_mtimes_for_hand_placed_keys() {
        let a = pk();
        let got = reconcile(None, Some((a, 123)), None);
        assert_eq!(got.generation, 1);
        assert_eq!(
            got.current,
            Some(KeyRecord {
                public_key: a,
                created_at: 123
            })
        );
        assert_eq!(got.previous, None);
    }

    #[test]
    fn reconcile_repairs_a_rotation_interrupted_before_the_state_write() {
        let (old, new) = (pk(), pk());
        let recorded = KeyState {
            generation: 1,
            current: Some(KeyRecord {
                public_key: old,
                created_at: 100,
            }),
            previous: None,
        };
        let got = reconcile(Some(&recorded), Some((new, 300)), Some((old, 290)));
        assert_eq!(got.generation, 2);
        assert_eq!(
            got.current,
            Some(KeyRecord {
                public_key: new,
                created_at: 300
            })
        );
        assert_eq!(
            got.previous,
            Some(PreviousKeyRecord {
                public_key: old,
                created_at: 100,
                rotated_at: 300
            })
        );
    }

    #[test]
    fn reconcile_drops_records_of_keys_whose_files_are_gone() {
        let (a, b) = (pk(), pk());
        let recorded = KeyState {
            generation: 2,
            current: Some(KeyRecord {
                public_key: b,
                created_at: 200,
            }),
            previous: Some(PreviousKeyRecord {
                public_key: a,
                created_at: 100,
                rotated_at: 200,
            }),
        };
        let got = reconcile(Some(&recorded), Some((b, 200)), None);
        assert_eq!(got.previous, None);
        assert_eq!(got.generation, 2);
    }
}

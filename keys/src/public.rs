use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A node's x25519 public key, written as `wg pubkey` writes it: standard base64 with
/// padding, 44 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("not base64: {0}")]
    Base64(String),
    #[error("decodes to {0} bytes, a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
}

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

pub(crate) fn decode_key(text: &str) -> Result<[u8; 32], KeyParseError> {
    let mut out = [0u8; 32];
    let text = text.trim();
    // decode_slice refuses to write past 32 bytes, so a longer input is caught without
    // allocating a buffer that would then need zeroizing.
    let n = STANDARD
        .decode_slice(text, &mut out)
        .map_err(|e| match e {
            base64::DecodeSliceError::OutputSliceTooSmall => {
                KeyParseError::Length(text.len() / 4 * 3)
            }
            base64::DecodeSliceError::DecodeError(e) => KeyParseError::Base64(e.to_string()),
        })?;
    if n != 32 {
        return Err(KeyParseError::Length(n));
    }
    Ok(out)
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A node's x25519 public key, written as `wg pubkey` writes it: standard base64 with
/// padding, 44 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

/// Why a key string was rejected.
///
/// The messages never quote the input: the same parser reads private keys, and an error
/// that ends up in a log must not leak any part of one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("not base64: {0}")]
    Base64(String),
    #[error("decodes to {0} bytes, a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
}

/// Number of base64 characters [`PublicKey::fingerprint`] keeps.
pub const FINGERPRINT_LEN: usize = 8;

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

    /// Short form for status output and logs: the first 8 characters of the base64 key
    /// (48 bits), not a hash, so an operator can match it by eye against `wg show` output
    /// and peer configs, which print the full base64 key.
    pub fn fingerprint(&self) -> String {
        let mut full = self.to_base64();
        full.truncate(FINGERPRINT_LEN);
        full
    }
}

/// Decodes a `wg genkey`/`wg pubkey` style key into `out`.
///
/// Decoding into a buffer the caller owns lets a private key be decoded straight into
/// zeroizing storage; on error `out` may hold a partial decode, which the caller's
/// `Zeroizing` wipes.
pub(crate) fn decode_key_into(text: &str, out: &mut [u8; 32]) -> Result<(), KeyParseError> {
    let text = text.trim();
    // decode_slice refuses to write past 32 bytes, so a longer input is caught without
    // allocating a buffer that would then need zeroizing.
    let n = STANDARD.decode_slice(text, out).map_err(|e| match e {
        base64::DecodeSliceError::OutputSliceTooSmall => KeyParseError::Length(text.len() / 4 * 3),
        base64::DecodeSliceError::DecodeError(e) => KeyParseError::Base64(describe(&e)),
    })?;
    if n != 32 {
        return Err(KeyParseError::Length(n));
    }
    Ok(())
}

/// base64's own messages quote the offending byte; keep only its position.
fn describe(e: &base64::DecodeError) -> String {
    match e {
        base64::DecodeError::InvalidByte(offset, _) => {
            format!("invalid character at offset {offset}")
        }
        base64::DecodeError::InvalidLength(len) => {
            format!("{len} symbols is not a valid base64 length")
        }
        base64::DecodeError::InvalidLastSymbol(offset, _) => {
            format!("non-canonical final character at offset {offset}")
        }
        base64::DecodeError::InvalidPadding => "bad padding".to_owned(),
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        decode_key_into(s, &mut out)?;
        Ok(Self(out))
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

// Serialized as the base64 string so configs and the state file read like `wg` output.
impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PublicKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 WireGuard public key (44 characters)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PublicKey, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE_PUBLIC_HEX: &str =
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    fn alice() -> PublicKey {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&ALICE_PUBLIC_HEX[2 * i..2 * i + 2], 16).unwrap();
        }
        PublicKey::from_bytes(bytes)
    }

    #[test]
    fn base64_is_44_chars_with_padding_and_round_trips() {
        let text = alice().to_base64();
        assert_eq!(text, "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
        assert_eq!(text.parse::<PublicKey>(), Ok(alice()));
    }

    #[test]
    fn surrounding_whitespace_and_trailing_newline_are_accepted() {
        let text = format!("  {}\n", alice().to_base64());
        assert_eq!(text.parse::<PublicKey>(), Ok(alice()));
    }

    #[test]
    fn wrong_lengths_are_rejected_with_the_decoded_length() {
        assert_eq!(
            "AAAA".parse::<PublicKey>(),
            Err(KeyParseError::Length(3)),
            "too short"
        );
        let long = format!("{}AAAA", &alice().to_base64()[..43]);
        assert!(matches!(
            long.parse::<PublicKey>(),
            Err(KeyParseError::Base64(_) | KeyParseError::Length(_))
        ));
        let sixty_four = "A".repeat(64);
        assert!(matches!(
            sixty_four.parse::<PublicKey>(),
            Err(KeyParseError::Length(n)) if n > 32
        ));
    }

    #[test]
    fn parse_errors_do_not_quote_the_input() {
        let err = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066Sp!qqbTmo="
            .parse::<PublicKey>()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("offset 36"), "{msg}");
        assert!(!msg.contains('!'), "{msg}");
        assert!(!msg.contains("33"), "quotes the byte value: {msg}");
    }

    #[test]
    fn missing_padding_is_rejected_like_wg_does() {
        let unpadded = alice().to_base64().trim_end_matches('=').to_owned();
        assert!(unpadded.parse::<PublicKey>().is_err());
    }

    #[test]
    fn fingerprint_is_the_first_eight_base64_characters() {
        assert_eq!(alice().fingerprint(), "hSDwCYkw");
        assert!(alice().to_base64().starts_with(&alice().fingerprint()));
    }

    #[test]
    fn serde_uses_the_base64_string() {
        let json = serde_json::to_string(&alice()).unwrap();
        assert_eq!(json, "\"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\"");
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), alice());
        assert!(serde_json::from_str::<PublicKey>("\"AAAA\"").is_err());
    }
}

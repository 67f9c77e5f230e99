use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand_core::{OsRng, RngCore as _};
use x25519_dalek::StaticSecret;
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::public::{KeyParseError, PublicKey, decode_key_into};

/// Length of a key in base64, as `wg genkey` prints it (without the newline).
pub const KEY_BASE64_LEN: usize = 44;

/// A node's x25519 private key.
///
/// The secret is wiped when the value is dropped (x25519-dalek's `zeroize` feature).
/// There is deliberately no `Display` and no `Clone`: printing or copying the secret has
/// to go through [`PrivateKey::to_base64`] / [`PrivateKey::to_bytes`], whose results are
/// themselves zeroizing. `Debug` shows only the public key.
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A fresh key from the OS CSPRNG, clamped as `wg genkey` clamps it.
    ///
    /// x25519 clamps the scalar on every use, so clamping here changes no public key; it
    /// is done so our key files are indistinguishable from `wg genkey` output.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut *bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(StaticSecret::from(*bytes))
    }

    /// Parses `wg genkey` output. Surrounding whitespace (the trailing newline) is
    /// ignored. The bytes are kept as given, unclamped, so `to_base64` round-trips
    /// exactly. Errors never quote the input.
    pub fn from_base64(text: &str) -> Result<Self, KeyParseError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        decode_key_into(text, &mut bytes)?;
        Ok(Self(StaticSecret::from(*bytes)))
    }

    /// The key in `wg genkey` format: standard base64 with padding, 44 characters, no
    /// newline.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let mut buf = Zeroizing::new([0u8; KEY_BASE64_LEN]);
        let mut out = Zeroizing::new(String::with_capacity(KEY_BASE64_LEN));
        // encode_slice writes straight into our zeroizing buffer; encode_string would go
        // through an internal stack buffer that nobody wipes.
        match STANDARD.encode_slice(self.0.as_bytes(), &mut buf[..]) {
            Ok(n) => buf[..n].iter().for_each(|&b| out.push(char::from(b))),
            // 32 bytes always encode to exactly 44 characters.
            Err(_) => unreachable!("32 bytes encode to {KEY_BASE64_LEN} base64 characters"),
        }
        out
    }

    /// What a key file holds: the base64 key and a newline, like `wg genkey > file`.
    pub(crate) fn to_file_contents(&self) -> Zeroizing<Vec<u8>> {
        let text = self.to_base64();
        let mut out = Zeroizing::new(Vec::with_capacity(KEY_BASE64_LEN + 1));
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
        out
    }

    /// The public key, as `wg pubkey` computes it from this private key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// For handing to boringtun, which takes x25519-dalek 2 types.
    pub fn as_static_secret(&self) -> &StaticSecret {
        &self.0
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }
}

impl From<StaticSecret> for PrivateKey {
    fn from(secret: StaticSecret) -> Self {
        Self(secret)
    }
}

impl FromStr for PrivateKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

// Sound because the wrapped StaticSecret wipes itself in its own Drop (x25519-dalek
// `zeroize` feature), it just does not carry the marker.
impl ZeroizeOnDrop for PrivateKey {}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    fn hex32(hex: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    fn b64(bytes: [u8; 32]) -> String {
        STANDARD.encode(bytes)
    }

    /// RFC 7748 §6.1: (private, public) for Alice and Bob. The private scalars are not
    /// clamped, which also shows that we clamp at use exactly as `wg pubkey` does.
    const RFC7748_VECTORS: [(&str, &str); 2] = [
        (
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        ),
        (
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        ),
    ];

    #[test]
    fn public_key_matches_rfc7748_test_vectors_in_base64() {
        for (private_hex, public_hex) in RFC7748_VECTORS {
            let key = PrivateKey::from_base64(&b64(hex32(private_hex))).unwrap();
            assert_eq!(key.public_key().to_base64(), b64(hex32(public_hex)));
        }
    }

    #[test]
    fn rfc7748_vectors_in_wg_format_are_stable() {
        // The same vectors written out, so a regression in the base64 layer is caught
        // independently of the hex conversion above.
        let alice =
            PrivateKey::from_base64("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            alice.public_key().to_base64(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
        let bob = PrivateKey::from_base64("XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os=").unwrap();
        assert_eq!(
            bob.public_key().to_base64(),
            "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
        );
    }

    #[test]
    fn base64_round_trips_exactly_including_unclamped_keys() {
        for (private_hex, _) in RFC7748_VECTORS {
            let text = b64(hex32(private_hex));
            let key = PrivateKey::from_base64(&text).unwrap();
            assert_eq!(*key.to_base64(), text);
            assert_eq!(*key.to_bytes(), hex32(private_hex));
        }
        let generated = PrivateKey::generate();
        let again = PrivateKey::from_base64(&generated.to_base64()).unwrap();
        assert_eq!(*again.to_bytes(), *generated.to_bytes());
        assert_eq!(again.public_key(), generated.public_key());
    }

    #[test]
    fn generated_keys_are_clamped_like_wg_genkey() {
        for _ in 0..32 {
            let bytes = PrivateKey::generate().to_bytes();
            assert_eq!(bytes[0] & 7, 0);
            assert_eq!(bytes[31] & 0x80, 0);
            assert_eq!(bytes[31] & 0x40, 0x40);
        }
    }

    #[test]
    fn generated_keys_are_distinct() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(*a.to_bytes(), *b.to_bytes());
    }

    #[test]
    fn base64_is_44_chars_and_file_contents_end_with_newline() {
        let key = PrivateKey::generate();
        assert_eq!(key.to_base64().len(), KEY_BASE64_LEN);
        assert!(key.to_base64().ends_with('='));
        let file = key.to_file_contents();
        assert_eq!(file.len(), KEY_BASE64_LEN + 1);
        assert_eq!(file.last(), Some(&b'\n'));
        assert_eq!(&file[..KEY_BASE64_LEN], key.to_base64().as_bytes());
    }

    #[test]
    fn debug_shows_the_public_key_and_never_the_private_key() {
        let key = PrivateKey::generate();
        let debug = format!("{key:?}");
        let alt = format!("{key:#?}");
        assert_eq!(debug, format!("PrivateKey(public={})", key.public_key()));
        for shown in [&debug, &alt] {
            assert!(!shown.contains(key.to_base64().as_str()), "{shown}");
            assert!(!shown.contains(&key.to_base64()[..8]), "{shown}");
        }
    }

    #[test]
    fn invalid_private_keys_are_rejected_without_quoting_them() {
        let secretish = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LC#=";
        let msg = PrivateKey::from_base64(secretish).unwrap_err().to_string();
        assert!(!msg.contains("dwdt"), "{msg}");
        assert!(!msg.contains('#'), "{msg}");
        assert!(PrivateKey::from_base64("").is_err());
        assert!(PrivateKey::from_base64("AAAA").is_err());
    }

    #[test]
    fn static_secret_is_shared_not_copied_and_agrees_with_public_key() {
        let key = PrivateKey::generate();
        let from_secret = x25519_dalek::PublicKey::from(key.as_static_secret());
        assert_eq!(from_secret.as_bytes(), key.public_key().as_bytes());
        let wrapped = PrivateKey::from(key.as_static_secret().clone());
        assert_eq!(wrapped.public_key(), key.public_key());
    }

    #[test]
    fn private_key_is_zeroized_on_drop() {
        fn assert_zeroize<T: zeroize::Zeroize>() {}
        fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}
        // x25519-dalek's `zeroize` feature derives Zeroize with `#[zeroize(drop)]`, which
        // adds a Drop impl but not the ZeroizeOnDrop marker. A [u8; 32] alone needs no
        // drop, so needing one means that zeroizing Drop impl is present.
        assert_zeroize::<StaticSecret>();
        assert!(std::mem::needs_drop::<StaticSecret>());
        assert_zeroize_on_drop::<PrivateKey>();
    }

    /// Runs `wg pubkey` with `private` on stdin; `None` if `wg` is not installed.
    fn wg_pubkey(private: &str) -> Option<String> {
        let mut child = match Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("running `wg pubkey`: {e}"),
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(private.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "`wg pubkey` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap().trim_end().to_owned())
    }

    fn wg_missing(what: &str) {
        let msg = format!(
            "`wg` (wireguard-tools) is not on PATH: {what} was NOT checked against `wg pubkey`"
        );
        assert!(
            std::env::var_os("FLYNODE_REQUIRE_WG").is_none_or(|v| v != "1"),
            "{msg}, and FLYNODE_REQUIRE_WG=1 requires it"
        );
        eprintln!("WARNING: {msg}; install wireguard-tools to run this interop test");
    }

    #[test]
    fn public_key_matches_wg_pubkey_when_wg_is_installed() {
        let mut inputs: Vec<Zeroizing<Vec<u8>>> = (0..8)
            .map(|_| PrivateKey::generate().to_file_contents())
            .collect();
        // Unclamped scalars too: wg clamps on read, we clamp at use.
        for (private_hex, _) in RFC7748_VECTORS {
            let mut line = b64(hex32(private_hex)).into_bytes();
            line.push(b'\n');
            inputs.push(Zeroizing::new(line));
        }
        for input in inputs {
            let text = std::str::from_utf8(&input).unwrap();
            let ours = PrivateKey::from_base64(text)
                .unwrap()
                .public_key()
                .to_base64();
            let Some(theirs) = wg_pubkey(text) else {
                return wg_missing("our public key derivation");
            };
            assert_eq!(ours, theirs, "for private key file contents {text:?}");
        }
    }

    #[test]
    fn wg_genkey_output_parses_and_round_trips_when_wg_is_installed() {
        let out = match Command::new("wg").arg("genkey").output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return wg_missing("parsing `wg genkey` output");
            }
            Err(e) => panic!("running `wg genkey`: {e}"),
        };
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let key = PrivateKey::from_base64(&text).unwrap();
        assert_eq!(
            key.to_file_contents().as_slice(),
            text.as_bytes(),
            "same file format"
        );
        assert_eq!(Some(key.public_key().to_base64()), wg_pubkey(&text));
    }
}

//! flynode node keys.
//!
//! (Being written: see keys/ in the foundation issue.)

mod public;

pub use public::{KeyParseError, PublicKey};

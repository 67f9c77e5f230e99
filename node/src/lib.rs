//! flynode: the daemon and its command-line interface.
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod fleet;
pub mod forward;
pub mod ingress;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod routing;
pub mod xdp;

/// A capability that a later piece of work delivers. Commands that need it say so in one
/// line and exit with [`exit::NOT_YET`] instead of pretending.
#[derive(Debug, thiserror::Error)]
#[error("not available yet: {0}")]
pub struct NotYetImplemented(pub &'static str);

/// The exit codes of the `flynode` command, documented in `flynode --help`.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed (attach, I/O, kernel refused ...).
    pub const FAILURE: i32 = 1;
    /// Command-line usage error (clap's own code).
    pub const USAGE: i32 = 2;
    /// The configuration or routing map is invalid.
    pub const CONFIG: i32 = 3;
    /// A key is missing, unreadable, too widely readable, or would be overwritten.
    pub const KEYS: i32 = 4;
    /// No daemon answers on the control socket.
    pub const DAEMON_UNREACHABLE: i32 = 5;
    /// `keys rotate`: the new key is live, but not every peer moved to it in time (the
    /// previous key stays valid until the grace period ends).
    pub const ROTATION_INCOMPLETE: i32 = 6;
    /// The capability is not built yet (EX_UNAVAILABLE from sysexits.h).
    pub const NOT_YET: i32 = 69;
}

//! flynode: the daemon and its command-line interface.
pub mod config;
pub mod routing;

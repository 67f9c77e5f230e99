//! flynode's userspace WireGuard mesh, built on boringtun.
//!
//! - [`clock`]: the data path's millisecond clock.
//! - [`core`]: the sans-IO protocol core (peers, keys, cryptokey routing, rotation).
//! - [`io`]: the operating-system edges: batched UDP sockets and the TUN device.
//! - [`driver`]: threads that move packets between [`io`] and [`core`].
//! - [`sched`]: how the kernel schedules the data-path threads.

pub mod clock;
pub mod core;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod sched;

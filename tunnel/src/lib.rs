//! flynode's userspace WireGuard mesh, built on boringtun.
//!
//! Empty on purpose: the tunnel issue fills it with a sans-IO peer table (one
//! boringtun `Tunn` per peer and own key, cryptokey routing, timers) and a thin driver
//! that owns the UDP sockets and the TUN device. Nothing in flynode calls it yet.

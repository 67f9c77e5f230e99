//! Crate-private entry points the fuzz targets in `fuzz/` drive, gathered in one place
//! (see `fuzz/oracles`). Not an API: hidden from docs, and free to change with the code
//! it reaches.

pub use crate::io::tun::fuzzing::{
    Receiver, UdpCoalescer, VIRTIO_NET_HDR_LEN, VirtioNetHdr, Write,
};

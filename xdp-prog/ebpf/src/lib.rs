//! flynode's XDP classifier. The program itself is the `flynode-xdp` binary
//! (src/main.rs), built for `bpfel-unknown-none` by node/build.rs; this library exists so
//! that node can name this crate as a build-dependency (cargo then rebuilds node when it
//! changes).
#![no_std]

#![no_main]
//! See `flynode_fuzz_oracles::worker_packet` for the input format and the properties checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flynode_fuzz_oracles::worker_packet(data));

#![no_main]
//! See `flynode_fuzz_oracles::etcd_view` for the input format and the properties checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flynode_fuzz_oracles::etcd_view(data));

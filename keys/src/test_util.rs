//! Helpers shared by this crate's unit tests.
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Permission bits (with setuid/setgid/sticky) of a file.
pub fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

/// The names in a directory, sorted: what a test expects to be left behind.
pub fn entry_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

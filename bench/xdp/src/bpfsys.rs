//! The few `bpf(2)` calls the benchmark needs beyond `flynode_xsk::rawbpf` (which has no
//! array or hash maps), and a small assembler for hand-written programs.
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use flynode_xsk::rawbpf::Insn;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// A map for a hand-written program (see `flynode_xsk::rawbpf::create_map`).
pub fn create_map(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    flynode_xsk::rawbpf::create_map(
        map_type,
        key_size as u32,
        value_size as u32,
        max_entries,
        "fxb_map",
    )
}

/// `map[key] = value`; the slices must have the map's key and value sizes.
pub fn update_elem(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    flynode_xsk::rawbpf::map_update(map.as_fd(), key, value)
}

/// A tiny assembler: instructions, labels and jumps to them.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    pub fn op(&mut self, insn: Insn) {
        self.insns.push(insn);
    }

    pub fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }

    /// A jump instruction whose offset is filled in to reach `label`.
    pub fn jump(&mut self, insn: Insn, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.insns.push(insn);
    }

    pub fn finish(mut self) -> Vec<Insn> {
        for (at, name) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| *i)
                .expect("jump to an undefined label");
            // Offsets count from the instruction after the jump.
            let rel = (target as i64 - *at as i64 - 1) as i16 as u16 as u64;
            let Insn(raw) = self.insns[*at];
            self.insns[*at] = Insn((raw & !(0xffff << 16)) | (rel << 16));
        }
        self.insns
    }
}

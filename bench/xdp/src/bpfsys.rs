//! The few `bpf(2)` calls the benchmark needs beyond `flynode_xsk::rawbpf` (which has no
//! array or hash maps), and a small assembler for hand-written programs.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use flynode_xsk::rawbpf::Insn;

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `BPF_MAP_CREATE` prefix of `union bpf_attr` (up to `numa_node`; the kernel treats
/// the bytes we do not pass as zero).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
}

/// `BPF_MAP_UPDATE_ELEM` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const _: () = assert!(size_of::<MapCreateAttr>() == 28);
const _: () = assert!(size_of::<MapElemAttr>() == 32);

/// Calls `bpf(cmd, attr, sizeof(*attr))`.
///
/// # Safety
/// `attr` must be the attribute struct of `cmd`, and the pointers in it valid for the
/// kernel's reads during the call.
unsafe fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `T` of `size_of::<T>()` bytes; pointers in it are valid by
    // this function's contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn create_map(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
        ..Default::default()
    };
    // SAFETY: a BPF_MAP_CREATE attribute without pointers.
    let fd = unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "BPF_MAP_CREATE (type {map_type}, key {key_size} B, value {value_size} B): {e}"
            ),
        )
    })?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `map[key] = value`; the slices must have the map's key and value sizes (the kernel
/// reads exactly that many bytes).
pub fn update_elem(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: key and value point to live buffers; the caller passes the map's sizes.
    unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }
        .map_err(|e| io::Error::new(e.kind(), format!("BPF_MAP_UPDATE_ELEM: {e}")))?;
    Ok(())
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

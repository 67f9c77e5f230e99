//! Minimal `bpf(2)` wrappers: just enough to load a hand-assembled XDP program, create an
//! XSKMAP, attach the program to an interface with a BPF link, and run it with
//! `BPF_PROG_TEST_RUN` (plain or live frames).
//!
//! This exists so that tests and benchmarks can drive AF_XDP without an ELF loader or a C
//! build. The attribute structs below mirror the prefixes of `union bpf_attr` that each
//! command reads (include/uapi/linux/bpf.h); the kernel treats bytes past the size we pass
//! as zero, so each struct only goes as far as the last field we set.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{last_os_error, step_error, with_detail};

// `Insn` is handed to the kernel as a `u64` in host order; the nibble order of the
// register byte would be swapped on a big-endian host (C bitfield layout).
#[cfg(not(target_endian = "little"))]
compile_error!("rawbpf encodes eBPF instructions for little-endian hosts only");

/// XDP verdict: error, drop (and fire the `xdp_exception` tracepoint).
pub const XDP_ABORTED: u32 = 0;
/// XDP verdict: drop.
pub const XDP_DROP: u32 = 1;
/// XDP verdict: hand the packet to the kernel stack.
pub const XDP_PASS: u32 = 2;
/// XDP verdict: transmit out of the interface the packet came in on.
pub const XDP_TX: u32 = 3;
/// XDP verdict: redirect (to a device, CPU or AF_XDP socket) as set up by a helper.
pub const XDP_REDIRECT: u32 = 4;

// bpf(2) commands (enum bpf_cmd).
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_LINK_CREATE: u32 = 28;

const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
/// `enum bpf_attach_type` value for XDP links.
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// `src_reg` of a `ld_imm64` whose immediate is a map fd to be replaced by the map.
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
/// `BPF_OBJ_NAME_LEN`, including the terminating NUL.
const OBJ_NAME_LEN: usize = 16;
const VERIFIER_LOG_SIZE: usize = 64 * 1024;

/// One eBPF instruction, as the kernel's `struct bpf_insn` laid out in a little-endian
/// `u64`: bits 0–7 opcode, 8–11 dst register, 12–15 src register, 16–31 signed offset,
/// 32–63 signed immediate.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn(pub u64);

impl Insn {
    /// Encodes an instruction from its fields.
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn(
            code as u64
                | ((dst as u64 & 0xf) << 8)
                | ((src as u64 & 0xf) << 12)
                | ((off as u16 as u64) << 16)
                | ((imm as u32 as u64) << 32),
        )
    }

    /// `dst = imm` (64-bit, sign-extended): `BPF_ALU64 | BPF_MOV | BPF_K`.
    pub const fn mov64_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x07 | 0xb0, dst, 0, 0, imm)
    }

    /// `dst = *(u32 *)(src + off)`: `BPF_LDX | BPF_MEM | BPF_W`.
    pub const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x01 | 0x60, dst, src, off, 0)
    }

    /// `dst = map` for the map behind `fd`: a two-slot `BPF_LD | BPF_DW | BPF_IMM` with
    /// `src_reg = BPF_PSEUDO_MAP_FD`; the kernel swaps the fd for the map pointer.
    pub const fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
        [
            Insn::new(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd),
            Insn::new(0, 0, 0, 0, 0),
        ]
    }

    /// Calls helper number `helper`: `BPF_JMP | BPF_CALL`.
    pub const fn call(helper: i32) -> Insn {
        Insn::new(0x05 | 0x80, 0, 0, 0, helper)
    }

    /// Returns `r0`: `BPF_JMP | BPF_EXIT`.
    pub const fn exit() -> Insn {
        Insn::new(0x05 | 0x90, 0, 0, 0, 0)
    }

    /// The eight bytes the kernel reads for this instruction.
    pub const fn to_le_bytes(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }
}

/// An XDP program that returns `action` for every packet: `r0 = action; exit`.
pub fn xdp_return(action: u32) -> Vec<Insn> {
    vec![Insn::mov64_imm(0, action as i32), Insn::exit()]
}

/// An XDP program that redirects every packet to the AF_XDP socket registered in the
/// XSKMAP `map_fd` at the packet's RX queue index, and returns `fallback_action` when
/// there is none (the flags argument of `bpf_redirect_map` carries the fallback in its
/// low bits):
///
/// ```text
/// r2 = *(u32 *)(r1 + 16)   // xdp_md.rx_queue_index
/// r1 = map                 // ld_imm64, src_reg = BPF_PSEUDO_MAP_FD
/// r3 = fallback_action
/// call bpf_redirect_map    // helper 51
/// exit
/// ```
///
/// `map_fd` only needs to stay open until [`load_xdp`] returns; the program holds the map.
pub fn xdp_redirect_xsk(map_fd: RawFd, fallback_action: u32) -> Vec<Insn> {
    let [ld_lo, ld_hi] = Insn::ld_map_fd(1, map_fd);
    vec![
        Insn::ldx_w(2, 1, 16),
        ld_lo,
        ld_hi,
        Insn::mov64_imm(3, fallback_action as i32),
        Insn::call(BPF_FUNC_REDIRECT_MAP),
        Insn::exit(),
    ]
}

/// `BPF_MAP_CREATE` prefix of `union bpf_attr`.
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
    map_name: [u8; OBJ_NAME_LEN],
    map_ifindex: u32,
}

/// `BPF_MAP_*_ELEM` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_PROG_LOAD` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `BPF_PROG_TEST_RUN` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `BPF_LINK_CREATE` prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `struct xdp_md`, the context of an XDP program (and of an XDP test run).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

// The kernel rejects non-zero bytes it does not know, so no struct may have implicit
// (uninitialised) padding: every gap is an explicit zeroed field.
const _: () = assert!(size_of::<MapCreateAttr>() == 48);
const _: () = assert!(size_of::<MapElemAttr>() == 32);
const _: () = assert!(size_of::<ProgLoadAttr>() == 72);
const _: () = assert!(size_of::<TestRunAttr>() == 80);
const _: () = assert!(size_of::<LinkCreateAttr>() == 16);
const _: () = assert!(size_of::<XdpMd>() == 24);

/// Calls `bpf(cmd, attr, sizeof(*attr))`.
///
/// # Safety
/// `attr` must be the attribute struct of `cmd`, and every pointer stored in it must be
/// valid for the access the kernel makes through it during the call (reads of `*_in`
/// buffers, writes of the log and `*_out` buffers, of the sizes given next to them).
unsafe fn sys_bpf<T>(cmd: u32, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `T` of `size_of::<T>()` bytes; the
    // pointers inside it are valid by this function's contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
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

/// Takes ownership of the fd a successful `bpf()` call returned.
fn owned_fd(ret: libc::c_long) -> OwnedFd {
    // SAFETY: BPF_MAP_CREATE, BPF_PROG_LOAD and BPF_LINK_CREATE return a new fd (with
    // O_CLOEXEC) that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as RawFd) }
}

/// `name` truncated and reduced to the characters the kernel accepts in object names
/// (alphanumerics, `_` and `.`), NUL-padded.
fn object_name(name: &str) -> [u8; OBJ_NAME_LEN] {
    let mut out = [0u8; OBJ_NAME_LEN];
    let allowed = name.bytes().map(|b| {
        if b.is_ascii_alphanumeric() || b == b'.' {
            b
        } else {
            b'_'
        }
    });
    for (slot, b) in out[..OBJ_NAME_LEN - 1].iter_mut().zip(allowed) {
        *slot = b;
    }
    out
}

fn len_u32(len: usize, what: &str) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} is too long ({len})"),
        )
    })
}

/// Loads `insns` as an XDP program named `name` (sanitised and cut to 15 characters),
/// license "GPL".
///
/// When the kernel rejects the program, the load is retried with the verifier log on
/// (level 1, 64 KiB) and the error message carries that log.
pub fn load_xdp(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    let step = || format!("BPF_PROG_LOAD (XDP program {name:?})");
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: len_u32(insns.len(), "program")?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: object_name(name),
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    // SAFETY: `insns` (insn_cnt `Insn`s, each a `struct bpf_insn` by construction) and
    // `license` (NUL-terminated) outlive the call; no out-pointer is set.
    let first = match unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => return Ok(owned_fd(fd)),
        Err(e) => e,
    };

    // Like libbpf: the first attempt runs without a log (cheaper for big programs), the
    // retry collects the verifier's reasons.
    let mut log = vec![0u8; VERIFIER_LOG_SIZE];
    attr.log_level = 1;
    attr.log_size = VERIFIER_LOG_SIZE as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above, plus `log` is writable for `log_size` bytes until the call returns.
    let retry = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) };
    if let Ok(fd) = retry {
        // Transient failure (e.g. EAGAIN from the verifier): the retry went through.
        return Ok(owned_fd(fd));
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let truncated = match retry {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => " (truncated)",
        _ => "",
    };
    let detail = format!("verifier log{truncated}:\n{}", text.trim_end());
    Err(with_detail(step(), first, Some(detail)))
}

/// Creates a map of type `map_type` (`BPF_MAP_TYPE_*`) named `name`.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_name: object_name(name),
        ..Default::default()
    };
    // SAFETY: the attr carries no pointers.
    let fd = unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }.map_err(|e| {
        step_error(
            format!(
                "BPF_MAP_CREATE ({name}: type {map_type}, key {key_size} B, value {value_size} B, {max_entries} entries)"
            ),
            e,
        )
    })?;
    Ok(owned_fd(fd))
}

/// Creates an XSKMAP (`u32` queue index -> AF_XDP socket fd) with `max_entries` slots.
pub fn create_xskmap(max_entries: u32) -> io::Result<OwnedFd> {
    create_map(BPF_MAP_TYPE_XSKMAP, 4, 4, max_entries, "flynode_xsks")
}

/// Sets `map[key] = value`; the slices must have the sizes the map was created with
/// (the kernel reads exactly that many bytes from each).
pub fn map_update(map: BorrowedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0, // BPF_ANY
        ..Default::default()
    };
    // SAFETY: `key` and `value` are live buffers for the duration of the call, of the
    // sizes the caller created the map with.
    unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }
        .map_err(|e| step_error(format!("BPF_MAP_UPDATE_ELEM (key {key:02x?})"), e))?;
    Ok(())
}

/// Sets `map[key] = value` for a map with `u32` keys and values (for an XSKMAP, the value
/// is the AF_XDP socket's fd).
pub fn map_update_u32(map: BorrowedFd, key: u32, value: u32) -> io::Result<()> {
    map_update(map, &key.to_ne_bytes(), &value.to_ne_bytes())
}

/// Deletes `map[key]` for a map with `u32` keys.
pub fn map_delete_u32(map: BorrowedFd, key: u32) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        ..Default::default()
    };
    // SAFETY: `key` is a live u32, the key size the map was created with.
    unsafe { sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) }
        .map_err(|e| step_error(format!("BPF_MAP_DELETE_ELEM (key {key})"), e))?;
    Ok(())
}

/// Where an XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`), before an skb exists.
    Native,
    /// On the skb, in the core receive path (`XDP_FLAGS_SKB_MODE`); works on any device.
    Generic,
}

/// Attaches `prog` to the interface `ifindex` (in the calling thread's network
/// namespace) with a BPF link. Closing the returned link fd detaches the program.
pub fn attach_xdp(prog: BorrowedFd, ifindex: u32, mode: AttachMode) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: match mode {
            AttachMode::Native => XDP_FLAGS_DRV_MODE,
            AttachMode::Generic => XDP_FLAGS_SKB_MODE,
        },
    };
    // SAFETY: the attr carries no pointers.
    let fd = unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }.map_err(|e| {
        step_error(
            format!("BPF_LINK_CREATE (XDP {mode:?} on ifindex {ifindex})"),
            e,
        )
    })?;
    Ok(owned_fd(fd))
}

/// Outcome of [`test_run`].
#[derive(Clone, Copy, Debug)]
pub struct TestRun {
    /// The program's return value (the XDP verdict).
    pub retval: u32,
    /// Average time per run in nanoseconds, as measured by the kernel.
    pub duration_ns: u32,
}

/// Runs `prog` `repeat` times (0 counts as 1) on a copy of `data` with
/// `BPF_PROG_TEST_RUN`. `data` must be at least an Ethernet header (14 bytes). The
/// verdict is only reported, not executed.
pub fn test_run(prog: BorrowedFd, data: &[u8], repeat: u32) -> io::Result<TestRun> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len_u32(data.len(), "test packet")?,
        data_in: data.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: `data` is readable for data_size_in bytes; data_out/ctx are null, size 0.
    unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(|e| {
        step_error(
            format!("BPF_PROG_TEST_RUN ({} bytes, repeat {repeat})", data.len()),
            e,
        )
    })?;
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
    })
}

/// Runs `prog` `repeat` times on `frame` as if it had arrived on `ifindex` (in the
/// calling thread's network namespace) RX queue `rx_queue`, with
/// `BPF_F_TEST_XDP_LIVE_FRAMES`: the verdict is carried out for real. `XDP_TX` sends the
/// frame out of `ifindex` (on a veth, to its peer, which needs an XDP program of its own
/// to accept it), `XDP_REDIRECT` redirects it, `XDP_PASS` hands it to the stack.
/// `batch_size` is the number of frames per kernel batch (0: the kernel default, 64).
pub fn test_run_live(
    prog: BorrowedFd,
    ifindex: u32,
    rx_queue: u32,
    frame: &[u8],
    repeat: u32,
    batch_size: u32,
) -> io::Result<()> {
    let len = len_u32(frame.len(), "live frame")?;
    let ctx = XdpMd {
        data: 0,
        data_end: len,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: rx_queue,
        egress_ifindex: 0,
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size,
        ..Default::default()
    };
    // SAFETY: `frame` and `ctx` are readable for the sizes given; live mode forbids (and
    // we leave null) data_out and ctx_out.
    unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }.map_err(|e| {
        step_error(
            format!(
                "BPF_PROG_TEST_RUN live frames (ifindex {ifindex} queue {rx_queue}, \
                 {} bytes, repeat {repeat})",
                frame.len()
            ),
            e,
        )
    })?;
    Ok(())
}

/// The index of the interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} contains NUL"),
        )
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(last_os_error(format!("if_nametoindex({name:?})")));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipping: needs root (CAP_BPF, CAP_NET_ADMIN)");
        }
        root
    }

    /// Any Ethernet frame will do: XDP test runs need at least ETH_HLEN bytes.
    const FRAME: [u8; 64] = [0u8; 64];

    #[test]
    fn encodes_instructions_like_the_kernel() {
        // r0 = 1 -> b7 00 00 00 01 00 00 00
        assert_eq!(
            Insn::mov64_imm(0, 1).to_le_bytes(),
            [0xb7, 0, 0, 0, 1, 0, 0, 0]
        );
        // r2 = *(u32 *)(r1 + 16) -> 61 12 10 00 00 00 00 00
        assert_eq!(
            Insn::ldx_w(2, 1, 16).to_le_bytes(),
            [0x61, 0x12, 16, 0, 0, 0, 0, 0]
        );
        // ld_imm64 r1, map fd 7 -> 18 11 00 00 07 00 00 00 + zero slot
        let [lo, hi] = Insn::ld_map_fd(1, 7);
        assert_eq!(lo.to_le_bytes(), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(hi.0, 0);
        assert_eq!(Insn::call(51).to_le_bytes(), [0x85, 0, 0, 0, 51, 0, 0, 0]);
        assert_eq!(Insn::exit().to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        // Negative offsets and immediates keep their two's complement bits.
        assert_eq!(Insn::new(0, 0, 0, -1, -2).0, 0xffff_fffe_ffff_0000);
    }

    #[test]
    fn object_names_are_sanitised_and_truncated() {
        assert_eq!(&object_name("flynode-xdp")[..12], b"flynode_xdp\0");
        let long = object_name("a_very_long_program_name");
        assert_eq!(&long[..15], b"a_very_long_pro");
        assert_eq!(long[15], 0);
    }

    #[test]
    fn xdp_return_program_returns_its_action() {
        if !is_root() {
            return;
        }
        let prog = load_xdp("test_drop", &xdp_return(XDP_DROP)).expect("load");
        let run = test_run(prog.as_fd(), &FRAME, 10).expect("test run");
        assert_eq!(run.retval, XDP_DROP);
    }

    #[test]
    fn redirect_to_empty_xskmap_returns_fallback() {
        if !is_root() {
            return;
        }
        let map = create_xskmap(4).expect("xskmap");
        let prog = load_xdp(
            "test_redirect",
            &xdp_redirect_xsk(map.as_raw_fd(), XDP_PASS),
        )
        .expect("load");
        let run = test_run(prog.as_fd(), &FRAME, 1).expect("test run");
        assert_eq!(run.retval, XDP_PASS);
    }

    #[test]
    fn rejected_program_error_carries_verifier_log() {
        if !is_root() {
            return;
        }
        // Exit without setting r0: the verifier refuses to read an uninitialised register.
        let err = load_xdp("test_bogus", &[Insn::exit()]).expect_err("must be rejected");
        assert_eq!(crate::errno(&err), Some(libc::EACCES), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("BPF_PROG_LOAD"), "{msg}");
        assert!(msg.contains("verifier log"), "{msg}");
        assert!(msg.contains("R0 !read_ok"), "{msg}");
    }

    #[test]
    fn xskmap_takes_only_sockets_and_indexes_below_max_entries() {
        if !is_root() {
            return;
        }
        let map = create_xskmap(1).expect("xskmap");
        // An XSKMAP only takes AF_XDP socket fds; the map's own fd is not one.
        let err = map_update_u32(map.as_fd(), 0, map.as_raw_fd() as u32).unwrap_err();
        assert!(crate::errno(&err).is_some(), "{err}");
        // XSKMAP deletes of an empty slot succeed (xsk_map_delete_elem just swaps in
        // NULL); only an index past max_entries is an error.
        map_delete_u32(map.as_fd(), 0).expect("delete of an empty slot");
        let err = map_delete_u32(map.as_fd(), 5).unwrap_err();
        assert_eq!(crate::errno(&err), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn loopback_has_an_index_and_nonsense_does_not() {
        assert_eq!(ifindex("lo").expect("lo"), 1);
        assert!(ifindex("no-such-if0").is_err());
        assert_eq!(
            ifindex("bad\0name").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}

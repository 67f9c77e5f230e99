//! Part 1: what flynode's classifier costs per packet, against a program that only returns
//! XDP_DROP, both run by the kernel with `BPF_PROG_RUN` on the same frames in the same
//! run.
//!
//! Time per packet is the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID, so time
//! spent preempted by other tasks does not count) across one `BPF_PROG_RUN` of `repeat`
//! runs, divided by `repeat`. The kernel's own figure (`duration`, whole nanoseconds per
//! run) is printed next to it as a cross-check.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{Context, Result, bail};
use flynode::xdp::XdpClassifier;
use flynode_xdp_common::{AddrKey, Counter, ServiceKey, ServiceValue};
use flynode_xsk::rawbpf::{self, Insn, XDP_DROP, XDP_PASS, XDP_REDIRECT};

use crate::bpfsys::{self, Asm};
use crate::frames::{self, Macs};
use crate::sys;

/// Addresses of the classify benchmark (no traffic leaves the process: BPF_PROG_RUN).
const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 72, 1);
const SERVICE4: Ipv4Addr = Ipv4Addr::new(198, 18, 72, 10);
const SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x72, 0, 0, 0, 0, 0, 0x10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 7);
const SERVICE_PORT: u16 = 5353;
const WG_PORT: u16 = 51820;

#[derive(Clone, Debug)]
pub struct Options {
    pub repeat: u32,
    pub rounds: usize,
    pub cpu: usize,
    /// Register an AF_XDP socket for queue 0 so service/WireGuard hits take the real
    /// redirect path (XDP_REDIRECT) rather than the no-socket fallback (XDP_PASS).
    pub with_socket: bool,
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// Counter slot the classifier must increment (with / without a registered socket).
    expect: (Counter, Counter),
}

fn cases() -> Vec<Case> {
    let m = Macs::default();
    let payload = frames::pattern(64);
    let mut truncated = frames::udp4(m, (CLIENT4, 40000), (SERVICE4, SERVICE_PORT), &payload);
    truncated.truncate(frames::ETH_HLEN + 10);
    vec![
        Case {
            name: "ipv4 service hit",
            frame: frames::udp4(m, (CLIENT4, 40000), (SERVICE4, SERVICE_PORT), &payload),
            expect: (Counter::UserspaceService, Counter::SocketService),
        },
        Case {
            name: "ipv6 service hit",
            frame: frames::udp6(m, (CLIENT6, 40000), (SERVICE6, SERVICE_PORT), &payload),
            expect: (Counter::UserspaceService, Counter::SocketService),
        },
        Case {
            name: "wireguard data for us",
            frame: frames::udp4(
                m,
                (CLIENT4, 51820),
                (HOST, WG_PORT),
                &frames::wireguard_data(64),
            ),
            expect: (Counter::UserspaceWireguard, Counter::SocketWireguard),
        },
        Case {
            name: "drop: service addr, unserved port",
            frame: frames::udp4(m, (CLIENT4, 40000), (SERVICE4, 9999), &payload),
            expect: (Counter::DropUnknownPort, Counter::DropUnknownPort),
        },
        Case {
            name: "drop: truncated ipv4",
            frame: truncated,
            expect: (Counter::DropMalformedIpv4, Counter::DropMalformedIpv4),
        },
        Case {
            name: "pass: tcp to host",
            frame: frames::tcp4_syn(m, (CLIENT4, 40000), (HOST, 22)),
            expect: (Counter::PassNotUdp, Counter::PassNotUdp),
        },
        Case {
            name: "pass: udp to non-service",
            frame: frames::udp4(m, (CLIENT4, 40000), (HOST, SERVICE_PORT), &payload),
            expect: (Counter::PassNotService, Counter::PassNotService),
        },
    ]
}

/// The endpoints map of the benchmark: one IPv4 and one IPv6 service, and the node's
/// WireGuard endpoint.
fn endpoints() -> BTreeMap<ServiceKey, ServiceValue> {
    BTreeMap::from([
        (
            ServiceKey::new(AddrKey::from_ipv4(SERVICE4.octets()), SERVICE_PORT),
            ServiceValue::service(1, 0),
        ),
        (
            ServiceKey::new(AddrKey::from_ipv6(SERVICE6.octets()), SERVICE_PORT),
            ServiceValue::service(2, 0),
        ),
        (
            ServiceKey::new(AddrKey::from_ipv4(HOST.octets()), WG_PORT),
            ServiceValue::WIREGUARD,
        ),
    ])
}

/// Nanoseconds of CPU time the calling thread has used.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// One timed BPF_PROG_RUN: (CPU ns per run, kernel ns per run, verdict).
fn timed(prog: BorrowedFd, frame: &[u8], repeat: u32) -> Result<(f64, u32, u32)> {
    let t0 = thread_cpu_ns();
    let r = rawbpf::test_run(prog, frame, repeat)?;
    let t1 = thread_cpu_ns();
    Ok((
        (t1 - t0) as f64 / f64::from(repeat.max(1)),
        r.duration_ns,
        r.retval,
    ))
}

pub struct Row {
    pub name: &'static str,
    pub verdict: String,
    pub classifier_ns: f64,
    pub trivial_ns: f64,
    pub classifier_kernel_ns: f64,
    pub trivial_kernel_ns: f64,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.trivial_ns / self.classifier_ns
    }
}

pub const TARGET_RATIO: f64 = 0.6;

/// Runs part 1 and prints its table. Returns whether the target was met on the mean.
pub fn run(opts: &Options) -> Result<bool> {
    sys::pin(0, opts.cpu).with_context(|| format!("pin to CPU{}", opts.cpu))?;
    let mut classifier = XdpClassifier::load().context("load flynode's XDP classifier")?;
    classifier
        .apply_endpoints(&endpoints())
        .context("fill the endpoints map")?;
    // Keeps the socket (and its namespace) alive while the programs are timed; the
    // redirect-only reference uses it too.
    let socket = if opts.with_socket {
        Some(crate::xsk_for_test_run(&mut classifier)?)
    } else {
        None
    };
    let with_socket = opts.with_socket;
    let trivial = rawbpf::load_xdp("fxb_drop", &rawbpf::xdp_return(XDP_DROP))
        .context("load the trivial XDP_DROP program")?;
    let prog = classifier.program_fd()?;

    println!(
        "== classify: ns/packet via BPF_PROG_RUN, repeat {} x {} rounds (median), CPU{}, \
         AF_XDP socket in the XSKMAP: {} ==",
        opts.repeat,
        opts.rounds,
        opts.cpu,
        if with_socket { "yes" } else { "no" }
    );
    let mut rows = Vec::new();
    for case in cases() {
        sys::check_interrupted()?;
        // Check the frame takes the path it is meant to exercise.
        let before = classifier.counters()?;
        let one = rawbpf::test_run(prog, &case.frame, 1)?;
        let after = classifier.counters()?;
        let hit: Vec<Counter> = Counter::ALL
            .iter()
            .copied()
            .filter(|c| after.get(*c) != before.get(*c))
            .collect();
        let expected = if with_socket {
            case.expect.0
        } else {
            case.expect.1
        };
        if hit != [expected] {
            bail!(
                "frame `{}`: classifier counted {:?} (verdict {}), expected {:?}",
                case.name,
                hit,
                one.retval,
                expected
            );
        }
        let mut c_cpu = Vec::new();
        let mut t_cpu = Vec::new();
        let mut c_k = Vec::new();
        let mut t_k = Vec::new();
        for round in 0..opts.rounds {
            sys::check_interrupted()?;
            // Alternate the order so neither program always runs on a warmer cache.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_classifier in order {
                let p = if is_classifier { prog } else { trivial.as_fd() };
                let (cpu_ns, kernel_ns, _) = timed(p, &case.frame, opts.repeat)?;
                if is_classifier {
                    c_cpu.push(cpu_ns);
                    c_k.push(f64::from(kernel_ns));
                } else {
                    t_cpu.push(cpu_ns);
                    t_k.push(f64::from(kernel_ns));
                }
            }
        }
        rows.push(Row {
            name: case.name,
            verdict: format!("{} ({})", verdict_name(one.retval), expected.name()),
            classifier_ns: sys::median(&mut c_cpu),
            trivial_ns: sys::median(&mut t_cpu),
            classifier_kernel_ns: sys::median(&mut c_k),
            trivial_kernel_ns: sys::median(&mut t_k),
        });
    }
    let ok = print_table(&rows);
    reference_lookups(opts, trivial.as_fd(), &cases()[0].frame)?;
    if let Some(socket) = &socket {
        reference_redirect(opts, trivial.as_fd(), socket, &cases()[0].frame)?;
    }
    Ok(ok)
}

/// The floor under any classifier that looks a service up in a hash map: the trivial
/// program plus one lookup of a 20-byte key (flynode's `ServiceKey`) in a hash map of the
/// same capacity as flynode's, hit and miss, timed like the rows above.
fn reference_lookups(opts: &Options, trivial: BorrowedFd, frame: &[u8]) -> Result<()> {
    let map = bpfsys::create_map(
        bpfsys::BPF_MAP_TYPE_HASH,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        flynode_xdp_common::MAX_SERVICES,
    )?;
    let key = |addr: Ipv4Addr, port: u16| -> [u8; 20] {
        let mut k = [0u8; 20];
        k[..16].copy_from_slice(&AddrKey::from_ipv4(addr.octets()).addr);
        k[16..18].copy_from_slice(&port.to_be_bytes());
        k
    };
    bpfsys::update_elem(
        &map,
        &key(SERVICE4, SERVICE_PORT),
        &[1, 0, 0, 0, 0, 0, 0, 0],
    )?;
    let program = |k: [u8; 20]| {
        let mut a = Asm::default();
        for (i, w) in k.chunks_exact(4).enumerate() {
            let w = u32::from_ne_bytes(w.try_into().expect("4 bytes"));
            // *(u32 *)(r10 - 24 + 4i) = w
            a.op(Insn::new(0x62, 10, 0, -24 + 4 * i as i16, w as i32));
        }
        a.op(Insn::new(0xbf, 2, 10, 0, 0)); // r2 = r10
        a.op(Insn::new(0x07, 2, 0, 0, -24)); // r2 -= 24
        for i in Insn::ld_map_fd(1, map.as_raw_fd()) {
            a.op(i);
        }
        a.op(Insn::call(1)); // bpf_map_lookup_elem
        a.op(Insn::mov64_imm(0, XDP_DROP as i32));
        a.op(Insn::exit());
        a.finish()
    };
    let hit = rawbpf::load_xdp("fxb_ref_hit", &program(key(SERVICE4, SERVICE_PORT)))?;
    let miss = rawbpf::load_xdp("fxb_ref_miss", &program(key(HOST, SERVICE_PORT)))?;
    let mut rows = Vec::new();
    for (name, prog) in [
        ("XDP_DROP + 1 hash lookup (hit)", hit.as_fd()),
        ("XDP_DROP + 1 hash lookup (miss)", miss.as_fd()),
    ] {
        let (p, t) = against_trivial(opts, prog, trivial, frame)?;
        rows.push((name, p, t));
    }
    println!(
        "reference programs (same frame as the first row): one lookup in a hash map of \
         20-byte keys ({} entries capacity), the alternative to flynode's table; the \
         redirect alone:",
        flynode_xdp_common::MAX_SERVICES
    );
    for (name, p, t) in rows {
        println!(
            "  {name:<34} {p:>7.2} ns (trivial {t:.2} ns): one lookup costs {:.2} ns; \
             ratio trivial/this {:.3}",
            p - t,
            t / p
        );
    }
    Ok(())
}

/// The floor under any classifier that hands datagrams to AF_XDP: a program that does
/// nothing but `bpf_redirect_map` into an XSKMAP holding the same socket, timed like the
/// rows above. No classifier's hit rows can score above its ratio.
fn reference_redirect(
    opts: &Options,
    trivial: BorrowedFd,
    socket: &crate::afxdp::TestRunSocket,
    frame: &[u8],
) -> Result<()> {
    let xsks = rawbpf::create_xskmap(1)?;
    rawbpf::map_update_u32(xsks.as_fd(), 0, socket.xsk.fd().as_raw_fd() as u32)?;
    let redirect = rawbpf::load_xdp(
        "fxb_redirect",
        &rawbpf::xdp_redirect_xsk(xsks.as_raw_fd(), XDP_PASS),
    )?;
    let (p, t) = against_trivial(opts, redirect.as_fd(), trivial, frame)?;
    println!(
        "  {:<34} {p:>7.2} ns (trivial {t:.2} ns): the redirect costs {:.2} ns; ratio \
         trivial/this {:.3} (the ceiling of any classifier's hit rows)",
        "bpf_redirect_map to the AF_XDP socket",
        p - t,
        t / p
    );
    Ok(())
}

/// Median CPU ns per run of `prog` and of `trivial` on `frame`, timed in alternation.
fn against_trivial(
    opts: &Options,
    prog: BorrowedFd,
    trivial: BorrowedFd,
    frame: &[u8],
) -> Result<(f64, f64)> {
    let mut p = Vec::new();
    let mut t = Vec::new();
    for _ in 0..opts.rounds {
        sys::check_interrupted()?;
        p.push(timed(prog, frame, opts.repeat)?.0);
        t.push(timed(trivial, frame, opts.repeat)?.0);
    }
    Ok((sys::median(&mut p), sys::median(&mut t)))
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_REDIRECT => "XDP_REDIRECT",
        rawbpf::XDP_TX => "XDP_TX",
        _ => "XDP_ABORTED",
    }
}

fn print_table(rows: &[Row]) -> bool {
    println!(
        "{:<34} {:<40} {:>10} {:>10} {:>16} {:>7}  target >= {TARGET_RATIO}",
        "frame", "verdict (counter)", "classif ns", "trivial ns", "kernel ns c/t", "ratio",
    );
    for r in rows {
        let ratio = r.ratio();
        println!(
            "{:<34} {:<40} {:>10.2} {:>10.2} {:>16} {:>7.3}  {}",
            r.name,
            r.verdict,
            r.classifier_ns,
            r.trivial_ns,
            format!("{:.0}/{:.0}", r.classifier_kernel_ns, r.trivial_kernel_ns),
            ratio,
            pass_fail(ratio >= TARGET_RATIO)
        );
    }
    let mean = rows.iter().map(Row::ratio).sum::<f64>() / rows.len().max(1) as f64;
    let ok = mean >= TARGET_RATIO;
    println!(
        "mean ratio trivial/classifier: {mean:.3} (target >= {TARGET_RATIO}): {}",
        pass_fail(ok)
    );
    ok
}

pub fn pass_fail(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

//! AF_XDP end to end, as root, inside a throwaway network namespace: frames written into
//! veth `a` are redirected by XDP on `b` into an `XskSocket` on `b` queue 0.

#![deny(clippy::undocumented_unsafe_blocks)]

mod support;

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use flynode_xsk::rawbpf::{self, AttachMode};
use flynode_xsk::{BindMode, XskConfig, XskMode, XskSocket};
use support::{Redirect, Sender, is_root, receive, socket_on_b, test_seq, udp_frame, veth_netns};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Frame sizes from the minimum Ethernet frame to near the MTU.
fn size_of_frame(seq: u32) -> usize {
    64 + (seq as usize * 97) % (1400 - 64 + 1)
}

fn delivers_frames_in_order_and_intact(mode: AttachMode) {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let (_redirect, mut socket) = socket_on_b(mode, &XskConfig::default());
        let sender = Sender::on("a");
        let sent: Vec<Vec<u8>> = (0..100)
            .map(|seq| udp_frame(seq, size_of_frame(seq)))
            .collect();
        for frame in &sent {
            sender.send(frame);
        }
        let got = receive(&mut socket, sent.len(), TIMEOUT);
        let seqs: Vec<u32> = got.iter().filter_map(|f| test_seq(f)).collect();
        assert_eq!(seqs, (0..100).collect::<Vec<u32>>(), "order or loss");
        for (got, sent) in got.iter().zip(&sent) {
            assert_eq!(got, sent, "frame bytes differ");
        }
        // And nothing twice: the ring has no stale descriptors left over.
        assert!(receive(&mut socket, 1, Duration::from_millis(100)).is_empty());
    });
}

#[test]
fn native_xdp_delivers_frames_in_order_and_intact() {
    delivers_frames_in_order_and_intact(AttachMode::Native);
}

#[test]
fn generic_xdp_delivers_frames_in_order_and_intact() {
    delivers_frames_in_order_and_intact(AttachMode::Generic);
}

/// Sends `total` frames in bursts, draining each burst before the next, and checks that
/// every frame arrives, in order.
fn send_in_bursts(socket: &mut XskSocket, sender: &Sender, total: u32, burst: u32) {
    let mut next = 0;
    while next < total {
        let end = (next + burst).min(total);
        for seq in next..end {
            sender.send(&udp_frame(seq, size_of_frame(seq)));
        }
        let got = receive(socket, (end - next) as usize, TIMEOUT);
        let seqs: Vec<u32> = got.iter().filter_map(|f| test_seq(f)).collect();
        assert_eq!(
            seqs,
            (next..end).collect::<Vec<u32>>(),
            "burst at {next}\n{}",
            support::diagnose(socket)
        );
        for (frame, seq) in got.iter().zip(next..end) {
            assert_eq!(*frame, udp_frame(seq, size_of_frame(seq)));
        }
        next = end;
    }
}

#[test]
fn frames_are_recycled_through_a_small_umem() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let config = XskConfig {
            frame_count: 64,
            ..Default::default()
        };
        let (redirect, mut socket) = socket_on_b(AttachMode::Native, &config);
        let sender = Sender::on("a");
        send_in_bursts(&mut socket, &sender, 1000, 32);
        let stats = socket.statistics().unwrap();
        assert_eq!(stats.rx_dropped, 0, "{stats:?} ({:?} XDP)", redirect.mode);
    });
}

#[test]
fn free_list_tops_up_a_fill_ring_smaller_than_the_umem() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        // 256 frames but 32 fill ring slots: 224 frames wait in the free list and must
        // rotate through the fill ring as frames come back.
        let config = XskConfig {
            frame_count: 256,
            ring_size: 32,
            ..Default::default()
        };
        let (_redirect, mut socket) = socket_on_b(AttachMode::Native, &config);
        let sender = Sender::on("a");
        send_in_bursts(&mut socket, &sender, 600, 24);
        assert_eq!(socket.statistics().unwrap().rx_dropped, 0);
    });
}

#[test]
fn veth_binds_in_copy_mode_and_refuses_zero_copy() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let b = rawbpf::ifindex("b").unwrap();
        // With native XDP attached: veth has no ndo_xsk_wakeup, so no zero-copy.
        let _redirect = Redirect::attach(b, AttachMode::Native).unwrap();
        let config = |mode| XskConfig {
            mode,
            frame_count: 64,
            ring_size: 64,
            ..Default::default()
        };
        // A closed socket releases its queue from a kernel workqueue, so binding the
        // same queue right after dropping one may see EBUSY for a moment.
        let open = |mode| {
            let started = Instant::now();
            loop {
                match XskSocket::open(b, 0, &config(mode)) {
                    Err(e)
                        if flynode_xsk::errno(&e) == Some(libc::EBUSY)
                            && started.elapsed() < TIMEOUT =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    result => {
                        eprintln!("bind {mode:?} settled after {:?}", started.elapsed());
                        return result;
                    }
                }
            }
        };
        assert_eq!(open(BindMode::Auto).unwrap().mode(), XskMode::Copy);
        assert_eq!(open(BindMode::Copy).unwrap().mode(), XskMode::Copy);
        let err = open(BindMode::ZeroCopy).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bind AF_XDP socket"), "{msg}");
        assert!(msg.contains("zero-copy"), "{msg}");
        assert_eq!(flynode_xsk::errno(&err), Some(libc::EOPNOTSUPP), "{msg}");
        // The failed socket left the queue free.
        assert_eq!(open(BindMode::Copy).unwrap().mode(), XskMode::Copy);
    });
}

#[test]
fn a_queue_takes_one_socket_and_bad_targets_are_named() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let b = rawbpf::ifindex("b").unwrap();
        let config = XskConfig {
            frame_count: 64,
            ring_size: 64,
            ..Default::default()
        };
        let _first = XskSocket::open(b, 0, &config).unwrap();
        let err = XskSocket::open(b, 0, &config).unwrap_err();
        assert_eq!(flynode_xsk::errno(&err), Some(libc::EBUSY), "{err}");
        // veth has one RX queue.
        let err = XskSocket::open(b, 1, &config).unwrap_err();
        assert!(err.to_string().contains("queue 1"), "{err}");
        let err = XskSocket::open(9999, 0, &config).unwrap_err();
        assert!(err.to_string().contains("ifindex 9999"), "{err}");
        assert_eq!(flynode_xsk::errno(&err), Some(libc::ENODEV), "{err}");
    });
}

#[test]
fn statistics_count_drops_when_the_fill_ring_runs_dry() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let config = XskConfig {
            frame_count: 16,
            ring_size: 16,
            ..Default::default()
        };
        let (_redirect, mut socket) = socket_on_b(AttachMode::Native, &config);
        let fresh = socket.statistics().unwrap();
        assert!(fresh.extended, "kernel >= 5.9 reports all six counters");
        assert_eq!(fresh.rx_dropped, 0);

        // 64 frames, nobody reading: the first 16 take all the frames there are.
        let sender = Sender::on("a");
        for seq in 0..64 {
            sender.send(&udp_frame(seq, 64));
        }
        let dry = support::eventually(TIMEOUT, || socket.statistics().unwrap().rx_dropped >= 48);
        let stats = socket.statistics().unwrap();
        assert!(dry, "{}", support::diagnose(&socket));
        assert_eq!(stats.rx_dropped, 48, "{stats:?}");
        assert_eq!(stats.rx_fill_ring_empty_descs, 48, "{stats:?}");
        assert_eq!(stats.rx_invalid_descs, 0, "{stats:?}");

        let got = receive(&mut socket, 16, TIMEOUT);
        let seqs: Vec<u32> = got.iter().filter_map(|f| test_seq(f)).collect();
        assert_eq!(seqs, (0..16).collect::<Vec<u32>>());

        // The frames went back to the fill ring: traffic flows again.
        for seq in 100..116 {
            sender.send(&udp_frame(seq, 64));
        }
        let got = receive(&mut socket, 16, TIMEOUT);
        let seqs: Vec<u32> = got.iter().filter_map(|f| test_seq(f)).collect();
        assert_eq!(seqs, (100..116).collect::<Vec<u32>>());
        assert_eq!(socket.statistics().unwrap().rx_dropped, 48);
    });
}

#[test]
fn wait_times_out_without_traffic_and_wakes_with_it() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let (_redirect, socket) = socket_on_b(AttachMode::Native, &XskConfig::default());
        let started = std::time::Instant::now();
        assert!(!socket.wait(Duration::from_millis(50)).unwrap());
        assert!(started.elapsed() >= Duration::from_millis(45));
        Sender::on("a").send(&udp_frame(1, 64));
        assert!(socket.wait(TIMEOUT).unwrap());
    });
}

#[test]
fn live_frames_sent_with_xdp_tx_reach_the_peer_socket() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        // XDP_TX out of `a` lands in `b`'s XDP (native: veth needs the peer's NAPI).
        let (_redirect, mut socket) = socket_on_b(AttachMode::Native, &XskConfig::default());
        let a = rawbpf::ifindex("a").unwrap();
        let tx = rawbpf::load_xdp("xsk_test_tx", &rawbpf::xdp_return(rawbpf::XDP_TX)).unwrap();
        let frame = udp_frame(7, 128);
        rawbpf::test_run_live(tx.as_fd(), a, 0, &frame, 1000, 0).unwrap();
        let got = receive(&mut socket, 1000, TIMEOUT);
        assert_eq!(got.len(), 1000, "{:?}", socket.statistics());
        assert!(got.iter().all(|f| *f == frame));
    });
}

#[test]
fn a_panicking_callback_consumes_nothing() {
    if !is_root() {
        return;
    }
    let ns = veth_netns();
    ns.run(|| {
        let (_redirect, mut socket) = socket_on_b(AttachMode::Native, &XskConfig::default());
        let sender = Sender::on("a");
        for seq in 0..3 {
            sender.send(&udp_frame(seq, 64));
        }
        assert!(support::eventually(TIMEOUT, || {
            socket.wait(Duration::from_millis(10)).unwrap()
        }));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            socket.recv_batch(64, |_| panic!("callback failed"))
        }));
        assert!(panicked.is_err());
        let got = receive(&mut socket, 3, TIMEOUT);
        let seqs: Vec<u32> = got.iter().filter_map(|f| test_seq(f)).collect();
        assert_eq!(seqs, vec![0, 1, 2]);
    });
}

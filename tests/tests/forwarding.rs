//! End to end: client → anycast on an edge → mesh → worker → container, and back.
use std::time::Duration;

use flynode_tests::forwarding::{ServiceSpec, Topology, anycast, ask, client_addr, parse_echo};
use flynode_tests::node::require_root;

#[test]
fn a_container_sees_the_client_and_the_reply_comes_from_the_anycast_address() {
    require_root();
    // Node 1 is the edge the client uses; node 2 is the only worker.
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(Duration::from_secs(15));
    for v6 in [false, true] {
        let socket = topo.client_socket(v6, 40000 + u16::from(v6));
        let (reply, from) = ask(&socket, anycast(v6), b"hello")
            .unwrap_or_else(|| panic!("no reply (v6={v6}); logs:\n{}", topo.logs()));
        assert_eq!(
            from,
            anycast(v6),
            "the reply must come from the anycast address"
        );
        let (worker, saw) = parse_echo(&reply);
        assert_eq!(worker, "worker-2");
        assert_eq!(saw, client_addr(v6, 40000 + u16::from(v6)));
        assert!(reply.ends_with("| hello"), "{reply}");
    }
    let status = topo.daemon(1).status();
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&status["forwarding"]).unwrap()
    );
}

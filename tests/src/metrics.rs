//! A daemon's Prometheus endpoint, scraped from inside its namespace (every namespace has
//! its own loopback, so each node answers on the default 127.0.0.1:9477), and the
//! exposition read back into numbers.
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

pub use flynode::metrics::Samples;
use flynode::netns::Netns;

/// The default `[metrics] listen`.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477));

/// `GET path` on `addr` inside `ns`: the status code and the body.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let response = ns.enter(|| -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of head in {response:?}")))?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// The metrics of the daemon in `ns` (default address); panics unless it answers 200.
pub fn scrape(ns: &Netns) -> Samples {
    match get(ns, LISTEN, "/metrics") {
        Ok((200, body)) => Samples::parse(&body),
        Ok((code, body)) => panic!("GET /metrics in {}: {code}\n{body}", ns.name()),
        Err(e) => panic!("GET /metrics in {}: {e}", ns.name()),
    }
}

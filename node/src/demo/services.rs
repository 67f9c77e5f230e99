//! The services the demo's containers run: a UDP echo that says who it is and which
//! source address it saw, and a tiny authoritative DNS server for `flynode.test`. Both are
//! threads of the demo process whose sockets live in a container's network namespace, so
//! what they see is exactly what a container behind a worker sees.
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dns::{self, Data, Message, Record};
use crate::netns::Netns;

/// The name the DNS service answers for, and its addresses (RFC 2544, documentation).
pub const DNS_NAME: &str = "demo.flynode.test";
pub const DNS_A: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 53);
pub const DNS_AAAA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x53);
const ZONE: &str = "flynode.test";
/// The owner of the additional TXT record that tells the client what source address the
/// server saw (as `o-o.myaddr.l.google.com` does for resolvers).
pub const WHOAMI: &str = "whoami.flynode.test";
const RCODE_REFUSED: u8 = 5;

/// Running service threads; stopped and joined on drop.
#[derive(Default)]
pub struct Services {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Services {
    /// Echo on `addr` inside `ns`: answers every datagram with
    /// `"<name> saw <source address> | <payload>"`.
    pub fn echo(&mut self, ns: &Netns, name: &str, addr: SocketAddr) -> io::Result<()> {
        let name = name.to_owned();
        self.serve(ns, addr, move |payload, from| {
            let mut reply = format!("{name} saw {from} | ").into_bytes();
            reply.extend_from_slice(payload);
            Some(reply)
        })
    }

    /// DNS on `addr` inside `ns`, identifying itself as `name` (EDNS NSID).
    pub fn dns(&mut self, ns: &Netns, name: &str, addr: SocketAddr) -> io::Result<()> {
        let name = name.to_owned();
        self.serve(ns, addr, move |payload, from| {
            dns_answer(payload, from, &name)
        })
    }

    fn serve(
        &mut self,
        ns: &Netns,
        addr: SocketAddr,
        answer: impl Fn(&[u8], SocketAddr) -> Option<Vec<u8>> + Send + 'static,
    ) -> io::Result<()> {
        let socket = ns.enter(|| UdpSocket::bind(addr))??;
        // Short, so that the thread notices the stop flag promptly.
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::clone(&self.stop);
        self.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], from) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        }));
        Ok(())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The DNS server's whole logic: one query in, one response out (or silence for bytes
/// too short to hold a header, which cannot be answered).
pub fn dns_answer(query: &[u8], from: SocketAddr, server: &str) -> Option<Vec<u8>> {
    let q = match Message::decode(query) {
        Ok(q) if !q.flags.response => q,
        Ok(_) => return None,
        Err(_) => {
            let id = query.get(..2)?;
            let stub = Message {
                id: u16::from_be_bytes([id[0], id[1]]),
                ..Message::default()
            };
            return stub.response(dns::RCODE_FORMERR).encode().ok();
        }
    };
    let Some(question) = q.question.as_ref().filter(|_| q.flags.opcode == 0) else {
        let rcode = if q.flags.opcode == 0 {
            dns::RCODE_FORMERR
        } else {
            dns::RCODE_NOTIMP
        };
        return q.response(rcode).encode().ok();
    };
    let in_zone = question.name == ZONE || question.name.ends_with(&format!(".{ZONE}"));
    let rcode = if !in_zone {
        RCODE_REFUSED
    } else if question.name == DNS_NAME || question.name == ZONE {
        dns::RCODE_NOERROR
    } else {
        dns::RCODE_NXDOMAIN
    };
    let mut r = q.response(rcode);
    if question.name == DNS_NAME {
        let data = match question.qtype {
            dns::TYPE_A => Some(Data::A(DNS_A)),
            dns::TYPE_AAAA => Some(Data::Aaaa(DNS_AAAA)),
            _ => None,
        };
        r.answers.extend(data.map(|data| Record {
            name: DNS_NAME.into(),
            ttl: 60,
            data,
        }));
    }
    if in_zone {
        r.additional.push(Record {
            name: WHOAMI.into(),
            ttl: 0,
            data: Data::Txt(vec![from.to_string()]),
        });
    }
    r.edns = q.edns.as_ref().map(|e| dns::Edns {
        udp_payload: 512,
        nsid: e.nsid.as_ref().map(|_| server.as_bytes().to_vec()),
    });
    r.encode().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(name: &str, qtype: u16) -> Message {
        let q = Message::query(42, name, qtype).encode().unwrap();
        let from: SocketAddr = "198.18.10.100:40053".parse().unwrap();
        Message::decode(&dns_answer(&q, from, "ctr-3").unwrap()).unwrap()
    }

    #[test]
    fn the_demo_name_has_a_fixed_address_and_the_reply_says_who_answered_whom() {
        let r = ask("demo.flynode.test", dns::TYPE_A);
        assert_eq!((r.id, r.flags.rcode, r.flags.response), (42, 0, true));
        assert_eq!(r.answers[0].data, Data::A(DNS_A));
        assert_eq!(
            r.additional[0].data,
            Data::Txt(vec!["198.18.10.100:40053".into()])
        );
        assert_eq!(r.edns.unwrap().nsid.unwrap(), b"ctr-3");
        assert_eq!(
            ask("demo.flynode.test", dns::TYPE_AAAA).answers[0].data,
            Data::Aaaa(DNS_AAAA)
        );
    }

    #[test]
    fn other_names_are_nxdomain_in_the_zone_and_refused_outside() {
        let r = ask("nope.flynode.test", dns::TYPE_A);
        assert_eq!(r.flags.rcode, dns::RCODE_NXDOMAIN);
        assert!(r.answers.is_empty());
        assert_eq!(ask("example.org", dns::TYPE_A).flags.rcode, RCODE_REFUSED);
        assert!(ask("demo.flynode.test", dns::TYPE_TXT).answers.is_empty());
    }

    #[test]
    fn garbage_gets_formerr_and_a_stub_gets_silence() {
        let from: SocketAddr = "198.18.10.100:1".parse().unwrap();
        let r = dns_answer(b"\xab\xcdgarbage!!!!!", from, "x").unwrap();
        let r = Message::decode(&r).unwrap();
        assert_eq!((r.id, r.flags.rcode), (0xabcd, dns::RCODE_FORMERR));
        assert_eq!(dns_answer(b"\x01", from, "x"), None);
    }
}

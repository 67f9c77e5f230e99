//! Just enough of the DNS wire format (RFC 1035) for the demo's DNS service and client:
//! one question, A / AAAA / TXT records, and the EDNS(0) OPT record (RFC 6891) with the
//! NSID option (RFC 5001), which is how operators of anycast DNS ask "which server
//! answered?" (`dig +nsid`).
//!
//! Encoding writes names in full (compression is optional for senders); decoding follows
//! compression pointers, backwards only, so a pointer loop cannot exist. The decoder is
//! total: every byte string yields a message or a [`DnsError`].
use std::net::{Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const OPTION_NSID: u16 = 3;
/// The classic UDP limit; the size we advertise in OPT.
const UDP_PAYLOAD: u16 = 512;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("message cut short at byte {0}")]
    Truncated(usize),
    #[error("bad name at byte {0}")]
    BadName(usize),
    #[error("{0} questions (only 1 is supported)")]
    Questions(u16),
    #[error("question class {0} (only IN is supported)")]
    Class(u16),
    #[error("{0} bytes of garbage after the last record")]
    Trailing(usize),
    #[error("a name or label is too long to encode")]
    NameTooLong,
    #[error("a TXT string is longer than 255 bytes")]
    TxtTooLong,
}

/// The header flags the demo uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    pub response: bool,
    pub opcode: u8,
    pub authoritative: bool,
    pub recursion_desired: bool,
    pub rcode: u8,
}

impl Flags {
    fn encode(self) -> u16 {
        u16::from(self.response) << 15
            | u16::from(self.opcode & 0xf) << 11
            | u16::from(self.authoritative) << 10
            | u16::from(self.recursion_desired) << 8
            | u16::from(self.rcode & 0xf)
    }

    fn decode(v: u16) -> Flags {
        Flags {
            response: v & 0x8000 != 0,
            opcode: ((v >> 11) & 0xf) as u8,
            authoritative: v & 0x0400 != 0,
            recursion_desired: v & 0x0100 != 0,
            rcode: (v & 0xf) as u8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, dot-separated, without the final dot; `""` is the root.
    pub name: String,
    pub qtype: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Txt(Vec<String>),
    Other { rtype: u16, bytes: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: Data,
}

/// EDNS(0): present when the message carries an OPT record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edns {
    pub udp_payload: u16,
    /// Some(empty) in a query asks for the server's identifier; a response carries it.
    pub nsid: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    pub flags: Flags,
    pub question: Option<Question>,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    pub edns: Option<Edns>,
}

impl Message {
    /// A recursion-desired query for `name`/`qtype` that asks for the server's NSID.
    pub fn query(id: u16, name: &str, qtype: u16) -> Message {
        Message {
            id,
            flags: Flags {
                recursion_desired: true,
                ..Flags::default()
            },
            question: Some(Question {
                name: name.to_ascii_lowercase(),
                qtype,
            }),
            edns: Some(Edns {
                udp_payload: UDP_PAYLOAD,
                nsid: Some(Vec::new()),
            }),
            ..Message::default()
        }
    }

    /// The response skeleton for `self` (a query): same id and question, RD copied.
    pub fn response(&self, rcode: u8) -> Message {
        Message {
            id: self.id,
            flags: Flags {
                response: true,
                opcode: self.flags.opcode,
                authoritative: true,
                recursion_desired: self.flags.recursion_desired,
                rcode,
            },
            question: self.question.clone(),
            ..Message::default()
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, DnsError> {
        let mut out = Vec::with_capacity(128);
        let additional = self.additional.len() + usize::from(self.edns.is_some());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.flags.encode().to_be_bytes());
        for count in [
            usize::from(self.question.is_some()),
            self.answers.len(),
            self.authority.len(),
            additional,
        ] {
            let count = u16::try_from(count).map_err(|_| DnsError::NameTooLong)?;
            out.extend_from_slice(&count.to_be_bytes());
        }
        if let Some(q) = &self.question {
            write_name(&mut out, &q.name)?;
            out.extend_from_slice(&q.qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
        }
        for r in self
            .answers
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            write_record(&mut out, r)?;
        }
        if let Some(edns) = &self.edns {
            out.push(0); // the root name
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&edns.udp_payload.to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes()); // extended rcode, version 0, flags
            let mut options = Vec::new();
            if let Some(nsid) = &edns.nsid {
                let len = u16::try_from(nsid.len()).map_err(|_| DnsError::NameTooLong)?;
                options.extend_from_slice(&OPTION_NSID.to_be_bytes());
                options.extend_from_slice(&len.to_be_bytes());
                options.extend_from_slice(nsid);
            }
            let len = u16::try_from(options.len()).map_err(|_| DnsError::NameTooLong)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&options);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, DnsError> {
        let mut r = Reader { bytes, at: 0 };
        let id = r.u16()?;
        let flags = Flags::decode(r.u16()?);
        let qd = r.u16()?;
        let counts = [r.u16()?, r.u16()?, r.u16()?];
        let question = match qd {
            0 => None,
            1 => {
                let name = r.name()?;
                let qtype = r.u16()?;
                let class = r.u16()?;
                if class != CLASS_IN {
                    return Err(DnsError::Class(class));
                }
                Some(Question { name, qtype })
            }
            n => return Err(DnsError::Questions(n)),
        };
        let mut message = Message {
            id,
            flags,
            question,
            ..Message::default()
        };
        for (section, &count) in counts.iter().enumerate() {
            for _ in 0..count {
                match r.record()? {
                    Parsed::Record(rec) => match section {
                        0 => message.answers.push(rec),
                        1 => message.authority.push(rec),
                        _ => message.additional.push(rec),
                    },
                    Parsed::Opt(edns) => message.edns = Some(edns),
                }
            }
        }
        match bytes.len() - r.at {
            0 => Ok(message),
            n => Err(DnsError::Trailing(n)),
        }
    }
}

fn write_name(out: &mut Vec<u8>, name: &str) -> Result<(), DnsError> {
    let start = out.len();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|&l| l <= 63)
            .ok_or(DnsError::NameTooLong)?;
        out.push(len);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    if out.len() - start > 255 {
        return Err(DnsError::NameTooLong);
    }
    Ok(())
}

fn write_record(out: &mut Vec<u8>, r: &Record) -> Result<(), DnsError> {
    write_name(out, &r.name)?;
    let (rtype, rdata) = match &r.data {
        Data::A(a) => (TYPE_A, a.octets().to_vec()),
        Data::Aaaa(a) => (TYPE_AAAA, a.octets().to_vec()),
        Data::Txt(strings) => {
            let mut d = Vec::new();
            for s in strings {
                d.push(u8::try_from(s.len()).map_err(|_| DnsError::TxtTooLong)?);
                d.extend_from_slice(s.as_bytes());
            }
            (TYPE_TXT, d)
        }
        Data::Other { rtype, bytes } => (*rtype, bytes.clone()),
    };
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&r.ttl.to_be_bytes());
    let len = u16::try_from(rdata.len()).map_err(|_| DnsError::NameTooLong)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&rdata);
    Ok(())
}

enum Parsed {
    Record(Record),
    Opt(Edns),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let out = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or(DnsError::Truncated(self.at))?;
        self.at += n;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DnsError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A name at the cursor, following compression pointers. Each pointer must point
    /// before the run of labels it ends, so every jump lands strictly earlier than the
    /// previous one and the walk always ends.
    fn name(&mut self) -> Result<String, DnsError> {
        let mut labels: Vec<&[u8]> = Vec::new();
        let mut wire_len = 0usize;
        let mut pos = self.at;
        let mut run_start = pos;
        // Where the cursor resumes: after the first pointer, else after the final 0.
        let mut resume = None;
        loop {
            let len = *self.bytes.get(pos).ok_or(DnsError::Truncated(pos))?;
            match len {
                0 => {
                    self.at = resume.unwrap_or(pos + 1);
                    break;
                }
                1..=63 => {
                    let label = self
                        .bytes
                        .get(pos + 1..pos + 1 + usize::from(len))
                        .ok_or(DnsError::Truncated(pos))?;
                    wire_len += 1 + label.len();
                    if wire_len > 254 || !label.iter().all(|&b| is_name_byte(b)) {
                        return Err(DnsError::BadName(pos));
                    }
                    labels.push(label);
                    pos += 1 + usize::from(len);
                }
                0xc0..=0xff => {
                    let low = *self.bytes.get(pos + 1).ok_or(DnsError::Truncated(pos))?;
                    let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                    if target >= run_start {
                        return Err(DnsError::BadName(pos));
                    }
                    resume.get_or_insert(pos + 2);
                    pos = target;
                    run_start = target;
                }
                _ => return Err(DnsError::BadName(pos)),
            }
        }
        let name = labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(".");
        Ok(name)
    }

    fn record(&mut self) -> Result<Parsed, DnsError> {
        let name = self.name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl = self.u32()?;
        let len = usize::from(self.u16()?);
        let at = self.at;
        let rdata = self.take(len)?;
        if rtype == TYPE_OPT {
            return Ok(Parsed::Opt(Edns {
                udp_payload: class,
                nsid: nsid(rdata, at)?,
            }));
        }
        let data = match (rtype, rdata.len()) {
            (TYPE_A, 4) => Data::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(rdata);
                Data::Aaaa(Ipv6Addr::from(o))
            }
            (TYPE_TXT, _) => Data::Txt(txt(rdata, at)?),
            _ => Data::Other {
                rtype,
                bytes: rdata.to_vec(),
            },
        };
        Ok(Parsed::Record(Record { name, ttl, data }))
    }
}

/// Letters, digits, '-' and '_': what host names and service labels use. Anything else
/// would need escaping to print, and the demo never sends it.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn txt(mut rdata: &[u8], at: usize) -> Result<Vec<String>, DnsError> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = rdata.split_first() {
        let s = rest
            .get(..usize::from(len))
            .ok_or(DnsError::Truncated(at))?;
        out.push(String::from_utf8_lossy(s).into_owned());
        rdata = &rest[usize::from(len)..];
    }
    Ok(out)
}

fn nsid(mut rdata: &[u8], at: usize) -> Result<Option<Vec<u8>>, DnsError> {
    let mut found = None;
    while !rdata.is_empty() {
        let head = rdata.get(..4).ok_or(DnsError::Truncated(at))?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = rdata.get(4..4 + len).ok_or(DnsError::Truncated(at))?;
        if code == OPTION_NSID {
            found = Some(value.to_vec());
        }
        rdata = &rdata[4 + len..];
    }
    Ok(found)
}

pub fn type_name(t: u16) -> String {
    match t {
        TYPE_A => "A".into(),
        TYPE_AAAA => "AAAA".into(),
        TYPE_TXT => "TXT".into(),
        other => format!("TYPE{other}"),
    }
}

pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        RCODE_NOERROR => "NOERROR".into(),
        RCODE_FORMERR => "FORMERR".into(),
        RCODE_NXDOMAIN => "NXDOMAIN".into(),
        RCODE_NOTIMP => "NOTIMP".into(),
        other => format!("RCODE{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_query_has_the_rfc_1035_layout() {
        let mut q = Message::query(0x1234, "demo.flynode.test", TYPE_A);
        q.edns = None;
        let want: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
            \x04demo\x07flynode\x04test\x00\x00\x01\x00\x01";
        assert_eq!(q.encode().unwrap(), want);
        assert_eq!(Message::decode(want).unwrap(), q);
    }

    #[test]
    fn a_response_round_trips_with_records_and_nsid() {
        let q = Message::query(7, "Demo.Flynode.Test", TYPE_AAAA);
        let mut r = q.response(RCODE_NOERROR);
        r.answers.push(Record {
            name: "demo.flynode.test".into(),
            ttl: 60,
            data: Data::Aaaa("2001:db8:200::53".parse().unwrap()),
        });
        r.additional.push(Record {
            name: "whoami.flynode.test".into(),
            ttl: 0,
            data: Data::Txt(vec!["198.18.10.100:40053".into()]),
        });
        r.edns = Some(Edns {
            udp_payload: 512,
            nsid: Some(b"node-3".to_vec()),
        });
        let decoded = Message::decode(&r.encode().unwrap()).unwrap();
        assert_eq!(decoded, r);
        assert_eq!(decoded.question.unwrap().name, "demo.flynode.test");
        assert!(decoded.flags.response && decoded.flags.recursion_desired);
    }

    #[test]
    fn compressed_names_are_followed_backwards_only() {
        // Header, question demo.flynode.test A IN, one answer whose name points at 12.
        let mut m = Message::query(1, "demo.flynode.test", TYPE_A).response(RCODE_NOERROR);
        m.edns = None;
        let mut bytes = m.encode().unwrap();
        bytes[7] = 1; // ANCOUNT
        bytes.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 200, 53]);
        let decoded = Message::decode(&bytes).unwrap();
        assert_eq!(decoded.answers[0].name, "demo.flynode.test");
        assert_eq!(
            decoded.answers[0].data,
            Data::A(Ipv4Addr::new(198, 18, 200, 53))
        );
        // A pointer to itself (a loop) is an error, not a hang.
        let at = bytes.len() - 16;
        bytes[at + 1] = at as u8;
        assert_eq!(Message::decode(&bytes), Err(DnsError::BadName(at)));
    }

    #[test]
    fn malformed_messages_get_precise_errors() {
        assert_eq!(Message::decode(b"\x00\x01"), Err(DnsError::Truncated(2)));
        let mut two = Message::query(1, "a.test", TYPE_A);
        two.edns = None;
        let mut bytes = two.encode().unwrap();
        bytes[5] = 2;
        assert_eq!(Message::decode(&bytes), Err(DnsError::Questions(2)));
        bytes[5] = 1;
        bytes.push(0);
        assert_eq!(Message::decode(&bytes), Err(DnsError::Trailing(1)));
        assert_eq!(
            Message::query(1, &"a".repeat(64), TYPE_A).encode(),
            Err(DnsError::NameTooLong)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn queries_round_trip(id in any::<u16>(), labels in proptest::collection::vec("[a-z0-9_-]{1,20}", 0..6), qtype in any::<u16>()) {
            let q = Message::query(id, &labels.join("."), qtype);
            prop_assert_eq!(Message::decode(&q.encode().unwrap()).unwrap(), q);
        }
    }
}

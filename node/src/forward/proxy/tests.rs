use super::*;
use proptest::prelude::*;

/// Header bytes as the spec lays them out, built from pieces for readability.
fn bytes(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// UDP over IPv4: 192.0.2.1:54321 → 198.51.100.7:53.
fn v4_udp() -> Vec<u8> {
    bytes(&[
        &SIGNATURE,
        &[0x21],       // version 2, PROXY
        &[0x12],       // INET, DGRAM
        &[0x00, 0x0C], // 12 bytes follow
        &[192, 0, 2, 1],
        &[198, 51, 100, 7],
        &[0xD4, 0x31], // 54321
        &[0x00, 0x35], // 53
    ])
}

/// UDP over IPv6: [2001:db8::1]:40000 → [2001:db8::53]:443.
fn v6_udp() -> Vec<u8> {
    bytes(&[
        &SIGNATURE,
        &[0x21],
        &[0x22],       // INET6, DGRAM
        &[0x00, 0x24], // 36 bytes follow
        &[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ],
        &[
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53,
        ],
        &[0x9C, 0x40], // 40000
        &[0x01, 0xBB], // 443
    ])
}

/// `v4_udp` plus ALPN "h3", a 3-byte NOOP, custom 0xE7 "edge" and an empty unknown 0x7F.
fn v4_tlvs() -> Vec<u8> {
    let mut header = v4_udp();
    header[14..16].copy_from_slice(&[0x00, 12 + 5 + 6 + 7 + 3]);
    header.extend_from_slice(&bytes(&[
        &[0x01, 0x00, 0x02],
        b"h3",
        &[0x04, 0x00, 0x03, 0, 0, 0],
        &[0xE7, 0x00, 0x04],
        b"edge",
        &[0x7F, 0x00, 0x00],
    ]));
    header
}

/// `v4_udp` plus a CRC32C TLV, checksum computed by an independent bitwise CRC32C.
fn v4_crc() -> Vec<u8> {
    let mut header = v4_udp();
    header[15] = 12 + 7;
    header.extend_from_slice(&[0x03, 0x00, 0x04, 0xD6, 0x32, 0x79, 0x8B]);
    header
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Bit-at-a-time CRC32C, the reference the table is checked against.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn decode_err(bytes: &[u8]) -> DecodeError {
    decode(bytes).expect_err("decode should fail")
}

fn collect(header: &Header<'_>) -> Vec<(u8, Vec<u8>)> {
    header
        .tlvs()
        .map(|tlv| (tlv.kind, tlv.value.to_vec()))
        .collect()
}

#[test]
fn signature_is_the_spec_bytes() {
    assert_eq!(&SIGNATURE, b"\r\n\r\n\0\r\nQUIT\n");
}

#[test]
fn udp_header_lengths_are_28_and_52() {
    assert_eq!(udp_header_len(false), 28);
    assert_eq!(udp_header_len(true), 52);
    assert_eq!(v4_udp().len(), udp_header_len(false));
    assert_eq!(v6_udp().len(), udp_header_len(true));
}

#[test]
fn crc32c_matches_the_check_value() {
    assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
}

#[test]
fn decodes_udp_over_ipv4_and_leaves_the_payload() {
    let mut input = v4_udp();
    input.extend_from_slice(b"payload");
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, 28);
    assert_eq!(&input[len..], b"payload");
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(header.transport, Transport::Dgram);
    assert_eq!(
        header.addresses,
        Addresses::Inet {
            src: "192.0.2.1:54321".parse().unwrap(),
            dst: "198.51.100.7:53".parse().unwrap(),
        }
    );
    assert_eq!(
        header.endpoints(),
        Some((sock("192.0.2.1:54321"), sock("198.51.100.7:53")))
    );
    assert_eq!(header.tlvs().count(), 0);
}

#[test]
fn decodes_udp_over_ipv6() {
    let input = v6_udp();
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, 52);
    assert_eq!(header.transport, Transport::Dgram);
    assert_eq!(header.addresses.family(), Family::Inet6);
    assert_eq!(
        header.endpoints(),
        Some((sock("[2001:db8::1]:40000"), sock("[2001:db8::53]:443")))
    );
}

#[test]
fn decodes_tcp_families_too() {
    let mut input = v4_udp();
    input[13] = 0x11;
    let (header, _) = decode(&input).unwrap();
    assert_eq!(header.transport, Transport::Stream);
    assert!(header.endpoints().is_some());
}

#[test]
fn ipv4_mapped_ipv6_stays_inet6() {
    let src = sock("[::ffff:192.0.2.1]:1000");
    let dst = sock("[::ffff:198.51.100.7]:53");
    let mut out = [0u8; 64];
    let len = encode_udp(src, dst, &[], &mut out).unwrap();
    let (header, _) = decode(&out[..len]).unwrap();
    assert_eq!(header.addresses.family(), Family::Inet6);
    assert_eq!(header.endpoints(), Some((src, dst)));
}

#[test]
fn local_header_has_no_addresses() {
    let input = bytes(&[&SIGNATURE, &[0x20, 0x00, 0x00, 0x00], b"data"]);
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, 16);
    assert_eq!(header.command, Command::Local);
    assert_eq!(header.transport, Transport::Unspec);
    assert_eq!(header.addresses, Addresses::Unspec);
    assert_eq!(header.endpoints(), None);
}

#[test]
fn local_skips_any_family_and_block_unread() {
    // An INET block and a TLV: skipped, not parsed.
    let mut input = v4_tlvs();
    input[12] = 0x20;
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, input.len());
    assert_eq!(header.addresses, Addresses::Unspec);
    assert_eq!(header.tlvs().count(), 0);
    // Invalid family and transport nibbles, a length no family has, garbage inside.
    let input = bytes(&[&SIGNATURE, &[0x20, 0xFF, 0x00, 0x03], &[0xAA, 0xBB, 0xCC]]);
    assert_eq!(decode(&input).unwrap().1, 19);
    // A wrong checksum inside a LOCAL header goes unchecked.
    let mut input = v4_crc();
    input[12] = 0x20;
    *input.last_mut().unwrap() ^= 1;
    assert!(decode(&input).is_ok());
}

#[test]
fn local_still_needs_the_whole_block() {
    let input = bytes(&[&SIGNATURE, &[0x20, 0x11, 0x00, 0x0C], &[0; 11]]);
    assert_eq!(
        decode_err(&input),
        DecodeError::Truncated {
            needed: 28,
            have: 27
        }
    );
}

#[test]
fn proxy_with_unspec_family_is_accepted_without_addresses() {
    let input = bytes(&[
        &SIGNATURE,
        &[0x21, 0x00, 0x00, 0x05],
        &[1, 2, 3, 4, 5],
        b"x",
    ]);
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, 21);
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(header.addresses, Addresses::Unspec);
    assert_eq!(header.endpoints(), None);
    assert_eq!(header.tlvs().count(), 0);
}

#[test]
fn unix_addresses_are_skipped_and_tlvs_after_them_read() {
    let input = bytes(&[
        &SIGNATURE,
        &[0x21, 0x32, 0x00, 216 + 4],
        &[b'/'; 216],
        &[0xE0, 0x00, 0x01, 0x2A],
    ]);
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, input.len());
    assert_eq!(header.addresses, Addresses::Unix);
    assert_eq!(header.transport, Transport::Dgram);
    assert_eq!(header.endpoints(), None);
    assert_eq!(header.tlv(TLV_CUSTOM_MIN), Some(&[0x2A][..]));
}

#[test]
fn tlvs_are_iterated_in_order_including_noop_and_unknown() {
    let input = v4_tlvs();
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, input.len());
    assert_eq!(
        collect(&header),
        vec![
            (TLV_ALPN, b"h3".to_vec()),
            (TLV_NOOP, vec![0, 0, 0]),
            (0xE7, b"edge".to_vec()),
            (0x7F, vec![]),
        ]
    );
    assert_eq!(header.tlv(TLV_ALPN), Some(&b"h3"[..]));
    assert_eq!(header.tlv(0xE7), Some(&b"edge"[..]));
    assert_eq!(header.tlv(0x7F), Some(&[][..]));
    assert_eq!(header.tlv(TLV_AUTHORITY), None);
    assert!(header.endpoints().is_some());
}

#[test]
fn good_crc32c_is_accepted() {
    let input = v4_crc();
    let mut zeroed = input.clone();
    zeroed[31..35].fill(0);
    assert_eq!(crc32c_bitwise(&zeroed), 0xD632_798B);
    let (header, len) = decode(&input).unwrap();
    assert_eq!(len, 35);
    assert_eq!(header.tlv(TLV_CRC32C), Some(&[0xD6, 0x32, 0x79, 0x8B][..]));
}

#[test]
fn bad_crc32c_is_rejected() {
    let mut input = v4_crc();
    input[34] ^= 0x01;
    assert_eq!(
        decode_err(&input),
        DecodeError::BadChecksum {
            expected: 0xD632_798A,
            computed: 0xD632_798B
        }
    );
    // A flipped address bit is caught by the checksum too.
    let mut input = v4_crc();
    input[19] ^= 0x80;
    assert!(matches!(
        decode_err(&input),
        DecodeError::BadChecksum {
            expected: 0xD632_798B,
            ..
        }
    ));
}

#[test]
fn crc32c_of_wrong_length_is_rejected() {
    let mut input = v4_udp();
    input[15] = 12 + 6;
    input.extend_from_slice(&[0x03, 0x00, 0x03, 0, 0, 0]);
    assert_eq!(
        decode_err(&input),
        DecodeError::BadChecksumLength { offset: 28, len: 3 }
    );
}

#[test]
fn second_crc32c_is_rejected() {
    let mut input = v4_crc();
    input[15] = 12 + 14;
    input.extend_from_slice(&[0x03, 0x00, 0x04, 0, 0, 0, 0]);
    assert_eq!(
        decode_err(&input),
        DecodeError::DuplicateChecksum { offset: 35 }
    );
}

#[test]
fn truncation_at_every_length_is_reported() {
    for valid in [v4_udp(), v6_udp(), v4_tlvs(), v4_crc()] {
        for have in 0..valid.len() {
            let needed = if have < FIXED_LEN {
                FIXED_LEN
            } else {
                valid.len()
            };
            assert_eq!(
                decode(&valid[..have]),
                Err(DecodeError::Truncated { needed, have }),
                "{valid:02x?} cut at {have}"
            );
        }
        assert!(decode(&valid).is_ok());
    }
}

#[test]
fn other_protocols_have_a_bad_signature() {
    assert_eq!(
        decode_err(b"GET / HTTP/1.1\r\n\r\n"),
        DecodeError::BadSignature
    );
    assert_eq!(
        decode_err(b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 53\r\n"),
        DecodeError::BadSignature
    );
    // Short, but already not a signature.
    assert_eq!(decode_err(b"\r\n\r\nX"), DecodeError::BadSignature);
    let mut input = v4_udp();
    input[11] = 0x0B;
    assert_eq!(decode_err(&input), DecodeError::BadSignature);
}

#[test]
fn version_other_than_2_is_rejected() {
    for (byte, version) in [(0x11, 1), (0x01, 0), (0x31, 3), (0xF1, 15)] {
        let mut input = v4_udp();
        input[12] = byte;
        assert_eq!(decode_err(&input), DecodeError::BadVersion(version));
    }
}

#[test]
fn unknown_command_is_rejected() {
    for command in [0x2, 0xF] {
        let mut input = v4_udp();
        input[12] = 0x20 | command;
        assert_eq!(decode_err(&input), DecodeError::BadCommand(command));
    }
}

#[test]
fn unknown_family_is_rejected() {
    for family in [0x4, 0xF] {
        let mut input = v4_udp();
        input[13] = (family << 4) | 0x2;
        assert_eq!(decode_err(&input), DecodeError::BadFamily(family));
    }
}

#[test]
fn unknown_transport_is_rejected() {
    for transport in [0x3, 0xF] {
        let mut input = v4_udp();
        input[13] = 0x10 | transport;
        assert_eq!(decode_err(&input), DecodeError::BadTransport(transport));
    }
}

#[test]
fn length_below_the_address_block_is_rejected() {
    let mut input = v4_udp();
    input[15] = 11;
    assert_eq!(
        decode_err(&input),
        DecodeError::AddressBlockTooShort {
            family: Family::Inet,
            needed: 12,
            have: 11
        }
    );
    let mut input = v6_udp();
    input[15] = 12;
    assert_eq!(
        decode_err(&input),
        DecodeError::AddressBlockTooShort {
            family: Family::Inet6,
            needed: 36,
            have: 12
        }
    );
    let input = bytes(&[&SIGNATURE, &[0x21, 0x31, 0x00, 215], &[0; 215]]);
    assert_eq!(
        decode_err(&input),
        DecodeError::AddressBlockTooShort {
            family: Family::Unix,
            needed: 216,
            have: 215
        }
    );
}

#[test]
fn tlv_running_past_the_header_is_rejected() {
    // One or two stray bytes: not even a TLV header.
    for stray in [&[0x01][..], &[0x01, 0x00]] {
        let mut input = v4_udp();
        input[15] = 12 + stray.len() as u8;
        input.extend_from_slice(stray);
        assert_eq!(decode_err(&input), DecodeError::TlvTruncated { offset: 28 });
    }
    // A value longer than what the length field leaves, even if the input goes on.
    let mut input = v4_tlvs();
    input[15] -= 1;
    assert_eq!(
        decode_err(&input),
        DecodeError::TlvTruncated {
            offset: 28 + 5 + 6 + 7
        }
    );
}

#[test]
fn errors_read_as_one_line() {
    let message = DecodeError::AddressBlockTooShort {
        family: Family::Inet6,
        needed: 36,
        have: 12,
    }
    .to_string();
    assert_eq!(
        message,
        "PROXY v2 header: INET6 needs a 36-byte address block, length is 12"
    );
    assert_eq!(
        DecodeError::BadChecksum {
            expected: 1,
            computed: 2
        }
        .to_string(),
        "PROXY v2 header: CRC32C is 0x00000001, header sums to 0x00000002"
    );
}

#[test]
fn encodes_the_spec_bytes_for_ipv4_and_ipv6() {
    let mut out = [0u8; 64];
    let len = encode_udp(
        sock("192.0.2.1:54321"),
        sock("198.51.100.7:53"),
        &[],
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[..len], &v4_udp()[..]);
    let src = SocketAddr::V6(SocketAddrV6::new(
        "2001:db8::1".parse().unwrap(),
        40000,
        7,
        3,
    ));
    let len = encode_udp(src, sock("[2001:db8::53]:443"), &[], &mut out).unwrap();
    assert_eq!(&out[..len], &v6_udp()[..], "flow info and scope id dropped");
}

#[test]
fn encodes_tlvs_in_the_given_order() {
    let mut out = [0u8; 64];
    let tlvs: [(u8, &[u8]); 4] = [
        (TLV_ALPN, b"h3"),
        (TLV_NOOP, &[0, 0, 0]),
        (0xE7, b"edge"),
        (0x7F, b""),
    ];
    let len = encode_udp(
        sock("192.0.2.1:54321"),
        sock("198.51.100.7:53"),
        &tlvs,
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[..len], &v4_tlvs()[..]);
}

#[test]
fn encoder_fills_in_the_crc32c() {
    let mut out = [0xFFu8; 64];
    let len = encode_udp(
        sock("192.0.2.1:54321"),
        sock("198.51.100.7:53"),
        &[(TLV_CRC32C, &[0xAA; 4])],
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[..len], &v4_crc()[..]);
    assert!(decode(&out[..len]).is_ok());
}

#[test]
fn encodes_local() {
    let mut out = [0xFFu8; 20];
    assert_eq!(encode_local(&mut out), Ok(16));
    assert_eq!(
        &out[..16],
        &bytes(&[&SIGNATURE, &[0x20, 0x00, 0x00, 0x00]])[..]
    );
    assert_eq!(&out[16..], &[0xFF; 4], "bytes past the header untouched");
    let (header, len) = decode(&out).unwrap();
    assert_eq!((header.command, len), (Command::Local, 16));
}

#[test]
fn encode_rejects_mixed_families() {
    let v4 = sock("192.0.2.1:1");
    let v6 = sock("[2001:db8::1]:2");
    let mut out = [0u8; 64];
    assert_eq!(
        encode_udp(v4, v6, &[], &mut out),
        Err(EncodeError::MixedFamilies { src: v4, dst: v6 })
    );
    assert_eq!(
        encode_udp(v6, v4, &[], &mut out),
        Err(EncodeError::MixedFamilies { src: v6, dst: v4 })
    );
}

#[test]
fn encode_rejects_every_buffer_too_small() {
    let tlvs: [(u8, &[u8]); 1] = [(TLV_ALPN, b"h3")];
    for (src, dst, needed) in [
        (sock("192.0.2.1:1"), sock("192.0.2.2:2"), 33),
        (sock("[2001:db8::1]:1"), sock("[2001:db8::2]:2"), 57),
    ] {
        let mut out = vec![0u8; needed];
        for have in 0..needed {
            assert_eq!(
                encode_udp(src, dst, &tlvs, &mut out[..have]),
                Err(EncodeError::BufferTooSmall { needed, have })
            );
        }
        assert_eq!(encode_udp(src, dst, &tlvs, &mut out), Ok(needed));
    }
    for have in 0..FIXED_LEN {
        assert_eq!(
            encode_local(&mut [0u8; FIXED_LEN][..have]),
            Err(EncodeError::BufferTooSmall {
                needed: FIXED_LEN,
                have
            })
        );
    }
}

#[test]
fn encode_rejects_lengths_the_fields_cannot_hold() {
    let (src, dst) = (sock("192.0.2.1:1"), sock("192.0.2.2:2"));
    let mut out = vec![0u8; 1 << 17];
    let huge = vec![0u8; 65536];
    assert_eq!(
        encode_udp(src, dst, &[(0xE0, &huge)], &mut out),
        Err(EncodeError::TlvTooLong {
            kind: 0xE0,
            len: 65536
        })
    );
    // The largest block that fits: 12 address bytes + 3 + 65520 = 65535.
    let max = vec![7u8; 65520];
    let len = encode_udp(src, dst, &[(0xE0, &max)], &mut out).unwrap();
    assert_eq!(len, FIXED_LEN + 65535);
    let (header, decoded_len) = decode(&out[..len]).unwrap();
    assert_eq!(decoded_len, len);
    assert_eq!(header.tlv(0xE0), Some(&max[..]));
    let one_more = vec![7u8; 65521];
    assert_eq!(
        encode_udp(src, dst, &[(0xE0, &one_more)], &mut out),
        Err(EncodeError::HeaderTooLong { len: 65536 })
    );
}

#[test]
fn encode_rejects_bad_crc32c_placeholders() {
    let (src, dst) = (sock("192.0.2.1:1"), sock("192.0.2.2:2"));
    let mut out = [0u8; 64];
    assert_eq!(
        encode_udp(src, dst, &[(TLV_CRC32C, &[0; 3])], &mut out),
        Err(EncodeError::BadChecksumLength { len: 3 })
    );
    assert_eq!(
        encode_udp(
            src,
            dst,
            &[(TLV_CRC32C, &[0; 4]), (TLV_CRC32C, &[0; 4])],
            &mut out
        ),
        Err(EncodeError::DuplicateChecksum)
    );
}

fn tlv_list() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (
            any::<u8>().prop_filter("CRC32C is computed", |kind| *kind != TLV_CRC32C),
            prop::collection::vec(any::<u8>(), 0..48),
        ),
        0..6,
    )
}

fn round_trip(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, Vec<u8>)]) {
    let borrowed: Vec<(u8, &[u8])> = tlvs.iter().map(|(k, v)| (*k, &v[..])).collect();
    let mut out = vec![0u8; 1024];
    let len = encode_udp(src, dst, &borrowed, &mut out).unwrap();
    out.truncate(len + 5);
    let (header, decoded_len) = decode(&out).unwrap();
    assert_eq!(decoded_len, len);
    assert_eq!(header.command, Command::Proxy);
    assert_eq!(header.transport, Transport::Dgram);
    assert_eq!(header.endpoints(), Some((src, dst)));
    assert_eq!(&collect(&header), tlvs);
}

proptest! {
    #[test]
    fn ipv4_round_trips(
        src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
        sport in any::<u16>(), dport in any::<u16>(),
        tlvs in tlv_list(),
    ) {
        round_trip(
            SocketAddr::from((src, sport)),
            SocketAddr::from((dst, dport)),
            &tlvs,
        );
    }

    #[test]
    fn ipv6_round_trips(
        src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
        sport in any::<u16>(), dport in any::<u16>(),
        tlvs in tlv_list(),
    ) {
        round_trip(
            SocketAddr::from((src, sport)),
            SocketAddr::from((dst, dport)),
            &tlvs,
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok((header, len)) = decode(&input) {
            prop_assert!((FIXED_LEN..=input.len()).contains(&len));
            prop_assert!(header.tlvs().count() <= len);
        }
    }

    #[test]
    fn signed_bytes_never_panic(
        ver_cmd in prop_oneof![Just(0x20u8), Just(0x21), any::<u8>()],
        fam in prop_oneof![Just(0x00u8), Just(0x12), Just(0x22), Just(0x31), any::<u8>()],
        body in prop::collection::vec(any::<u8>(), 0..300),
        exact_len in any::<bool>(),
        len in any::<u16>(),
    ) {
        let len = if exact_len { body.len() as u16 } else { len };
        let input = bytes(&[&SIGNATURE, &[ver_cmd, fam], &len.to_be_bytes(), &body]);
        if let Ok((header, decoded_len)) = decode(&input) {
            prop_assert!(decoded_len <= input.len());
            prop_assert_eq!(decoded_len, FIXED_LEN + usize::from(len));
            let tlv_bytes: usize = header.tlvs().map(|tlv| 3 + tlv.value.len()).sum();
            prop_assert!(tlv_bytes <= decoded_len - FIXED_LEN);
        }
    }

    #[test]
    fn valid_addresses_with_arbitrary_tlv_bytes_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = v4_udp();
        input[14..16].copy_from_slice(&(12 + tail.len() as u16).to_be_bytes());
        input.extend_from_slice(&tail);
        match decode(&input) {
            Ok((header, len)) => {
                prop_assert_eq!(len, input.len());
                let tlv_bytes: usize = header.tlvs().map(|tlv| 3 + tlv.value.len()).sum();
                prop_assert_eq!(tlv_bytes, tail.len(), "TLVs tile the area");
            }
            Err(error) => {
                let tlv_error = matches!(
                    error,
                    DecodeError::TlvTruncated { .. }
                        | DecodeError::DuplicateChecksum { .. }
                        | DecodeError::BadChecksumLength { .. }
                        | DecodeError::BadChecksum { .. }
                );
                prop_assert!(tlv_error, "unexpected {:?}", error);
            }
        }
    }

    #[test]
    fn crc32c_table_matches_the_bitwise_definition(
        data in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        prop_assert_eq!(!crc32c_update(!0, &data), crc32c_bitwise(&data));
    }
}

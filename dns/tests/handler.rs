//! The DNS handler against hostile input, on real sockets: every query
//! type, compression-pointer loops, truncated, oversized and randomly
//! damaged packets, over UDP and TCP. After each, the server must still
//! answer a good query promptly: it neither crashed nor stalled.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use causeway_api::catalog::CatalogView;
use causeway_api::pb;
use causeway_dns::handler::ServeOptions;
use causeway_dns::serve;
use causeway_dns::zone::{Zone, ZoneOptions};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use proptest::prelude::*;

const NAME: &str = "payments.shop.svc.clusterset.local.";

/// One server for the whole file, on its own runtime.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let opts = ZoneOptions {
                    origin: "clusterset.local".into(),
                    ttl: 5,
                    negative_ttl: 5,
                    vip_base: "127.10.0.0".parse().unwrap(),
                    vip_prefix: 16,
                };
                let zone = Zone::build(&opts, &view()).unwrap();
                let (_zone_tx, zone_rx) = tokio::sync::watch::channel(Arc::new(zone));
                // The TCP port must match the UDP one: retry until free.
                let (udp, tcp, addr) = loop {
                    let udp = causeway_dns::bind_udp("127.0.0.1:0".parse().unwrap(), 1).unwrap();
                    let addr = udp[0].local_addr().unwrap();
                    if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                        break (udp, tcp, addr);
                    }
                };
                tx.send(addr).unwrap();
                serve(
                    zone_rx,
                    udp,
                    tcp,
                    ServeOptions::default(),
                    std::future::pending(),
                )
                .await
                .unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

fn view() -> CatalogView {
    CatalogView::from_snapshot(pb::CatalogSnapshot {
        revision: 1,
        sites: vec![pb::Site {
            name: "east".into(),
            available: true,
            ..Default::default()
        }],
        exports: vec![pb::SiteExports {
            site: "east".into(),
            exports: vec![pb::Export {
                service: "shop/payments".into(),
                ports: vec![pb::ServicePort {
                    port: 443,
                    protocol: "tcp".into(),
                    name: "https".into(),
                }],
                healthy_endpoints: 1,
                vip_index: 3,
                ..Default::default()
            }],
        }],
        ..Default::default()
    })
}

fn query(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    if edns {
        m.set_edns(Edns::new());
    }
    m.to_vec().unwrap()
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(server()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Receives until the reply with `id` arrives (replies to junk sent before
/// may come first); panics if none comes in time.
fn recv_reply(sock: &UdpSocket, id: u16) -> Message {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no reply to query {id}: {e} (server stalled or died)"));
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == id {
                return m;
            }
        }
    }
}

/// The server answers a good query correctly. `junk` is what was sent
/// before: its ID (damage can make it anything) is not reused, so its own
/// reply cannot pass for the answer.
fn assert_alive(sock: &UdpSocket, junk: &[u8]) {
    let taken = (junk.len() >= 2).then(|| u16::from_be_bytes([junk[0], junk[1]]));
    let id = loop {
        let id = rand::random::<u16>() | 1;
        if Some(id) != taken {
            break id;
        }
    };
    sock.send(&query(id, NAME, RecordType::A, false)).unwrap();
    let m = recv_reply(sock, id);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1, "{m:?}");
}

#[test]
fn every_query_type_gets_a_well_formed_answer() {
    let sock = client();
    for qtype in 0..=u16::MAX {
        let rt = RecordType::from(qtype);
        // Every type for a name that exists; the assigned range (and a
        // sample beyond) for a missing name and one outside the zone.
        let others = qtype <= 300 || qtype % 97 == 0;
        let names: &[&str] = if others {
            &[NAME, "nope.shop.svc.clusterset.local.", "example.com."]
        } else {
            &[NAME]
        };
        for name in names.iter().copied() {
            let id = qtype ^ 0x5a5a;
            sock.send(&query(id, name, rt, qtype % 2 == 0)).unwrap();
            let m = recv_reply(&sock, id);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            let code = m.metadata.response_code;
            assert!(
                matches!(
                    code,
                    ResponseCode::NoError
                        | ResponseCode::NXDomain
                        | ResponseCode::Refused
                        | ResponseCode::FormErr
                        | ResponseCode::NotImp
                ),
                "type {qtype} {name}: {code:?}"
            );
            for a in &m.answers {
                assert_eq!(a.record_type(), rt, "type {qtype} {name}: {m:?}");
            }
            if name == NAME && rt == RecordType::A {
                assert_eq!(m.answers.len(), 1);
            }
        }
    }
    assert_alive(&sock, &[]);
}

#[test]
fn compression_loops_truncation_and_oversize_are_survived() {
    let sock = client();
    let good = query(7, NAME, RecordType::A, true);
    // The question name is a pointer to itself, then a pointer past the
    // end, then two pointers to each other.
    let mut header = good[..12].to_vec();
    header[5] = 1; // one question
    let mut self_loop = header.clone();
    self_loop.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut past_end = header.clone();
    past_end.extend_from_slice(&[0xc0, 0xff, 0, 1, 0, 1]);
    let mut ping_pong = header.clone();
    ping_pong.extend_from_slice(&[1, b'a', 0xc0, 17, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
    // A header claiming 65535 of every section over a short body.
    let mut claims = good.clone();
    claims[4..12].copy_from_slice(&[0xff; 8]);
    // 65 000 bytes: the largest datagrams go through too.
    let mut oversized = good.clone();
    oversized.resize(65_000, 0xab);
    for junk in [self_loop, past_end, ping_pong, claims, oversized] {
        sock.send(&junk).unwrap();
        assert_alive(&sock, &junk);
    }
    // Every prefix of a good query.
    for n in 0..good.len() {
        sock.send(&good[..n]).unwrap();
    }
    assert_alive(&sock, &good);

    // TCP: a huge length prefix and a message cut short, each on its own
    // connection, then a good query on a fresh one.
    for bytes in [vec![0xff, 0xff, 1, 2, 3], {
        let mut v = (good.len() as u16 + 40).to_be_bytes().to_vec();
        v.extend_from_slice(&good);
        v
    }] {
        let mut s = TcpStream::connect(server()).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut s = TcpStream::connect(server()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = query(9, NAME, RecordType::A, false);
    s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&q).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let m = Message::from_vec(&body).unwrap();
    assert_eq!((m.metadata.id, m.answers.len()), (9, 1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random damage to a good query: flipped bytes, a cut, appended junk.
    #[test]
    fn damaged_queries_never_stall_or_crash_the_server(
        qtype in any::<u16>(),
        edns in any::<bool>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let sock = client();
        let mut q = query(11, NAME, RecordType::from(qtype), edns);
        for (at, x) in &flips {
            let i = at % q.len();
            q[i] ^= x;
        }
        q.truncate(cut % (q.len() + 1));
        q.extend_from_slice(&junk);
        sock.send(&q).unwrap();
        assert_alive(&sock, &q);
    }
}

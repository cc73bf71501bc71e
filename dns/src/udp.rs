//! UDP serving: one thread per socket (the sockets share the port with
//! SO_REUSEPORT, so the kernel spreads clients over them). Each thread
//! answers plain queries from the zone's precomputed answers
//! ([`crate::fast`]) without leaving the thread; anything else goes to the
//! general hickory-based [`Handler`] on the runtime.
//!
//! A thread holds its own `Arc` of the current zone and swaps it when the
//! watch channel's version moves (one atomic load per query): answering
//! never contends with catalog updates.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::sync::watch;

use crate::handler::Handler;
use crate::zone::Zone;

/// How often a serving thread wakes to see whether it should stop.
const POLL: Duration = Duration::from_millis(200);
/// How long a serving thread polls for the next query before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

/// Starts a serving thread per socket. They stop once `stop` is set.
pub fn spawn(
    sockets: Vec<UdpSocket>,
    zone: watch::Receiver<Arc<Zone>>,
    handler: Arc<Handler>,
    edns_udp_size: u16,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let rt = tokio::runtime::Handle::current();
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, sock)| {
            sock.set_nonblocking(false)?;
            sock.set_read_timeout(Some(POLL))?;
            let (zone, handler, stop, rt) =
                (zone.clone(), handler.clone(), stop.clone(), rt.clone());
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || serve(Arc::new(sock), zone, handler, edns_udp_size, stop, rt))
        })
        .collect()
}

fn serve(
    sock: Arc<UdpSocket>,
    mut zone_rx: watch::Receiver<Arc<Zone>>,
    handler: Arc<Handler>,
    edns_udp_size: u16,
    stop: Arc<AtomicBool>,
    rt: tokio::runtime::Handle,
) {
    let mut zone = zone_rx.borrow_and_update().clone();
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(4096);
    let noerror = metrics::counter!("causeway_dns_queries_total", "rcode" => "noerror");
    let nxdomain = metrics::counter!("causeway_dns_queries_total", "rcode" => "nxdomain");
    let fast = metrics::counter!("causeway_dns_fast_path_total");
    // Just after a query, poll for the next one without sleeping: under
    // load the thread then never sleeps, and clients are spared the
    // wake-up it would cost them. Idle, it blocks.
    let mut last = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let got = if last.elapsed() < SPIN {
            match rustix::net::recvfrom(&*sock, &mut buf[..], rustix::net::RecvFlags::DONTWAIT) {
                Ok((n, _, Some(addr))) => SocketAddr::try_from(addr).ok().map(|a| Ok((n, a))),
                Ok(_) => None,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(e) => Some(Err(std::io::Error::from(e))),
            }
        } else {
            Some(sock.recv_from(&mut buf))
        };
        let (n, src) = match got {
            None => continue,
            Some(Ok(x)) => x,
            Some(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "receiving a DNS query failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        last = std::time::Instant::now();
        if src.port() == 0 || src.ip().is_unspecified() {
            continue;
        }
        if zone_rx.has_changed().unwrap_or(false) {
            zone = zone_rx.borrow_and_update().clone();
        }
        if zone.ready {
            if let Some(len) = zone.wire.answer(&buf[..n], &mut out, edns_udp_size) {
                if let Err(e) = sock.send_to(&out[..len], src) {
                    tracing::debug!(error = %e, %src, "sending a DNS answer failed");
                }
                fast.increment(1);
                if out[3] & 0x0f == 3 {
                    nxdomain.increment(1);
                } else {
                    noerror.increment(1);
                }
                continue;
            }
        }
        let query = buf[..n].to_vec();
        let (handler, sock) = (handler.clone(), sock.clone());
        rt.spawn(async move { general(handler, query, src, sock).await });
    }
}

/// The general path: hickory decodes the query and [`Handler`] answers it.
async fn general(handler: Arc<Handler>, query: Vec<u8>, src: SocketAddr, sock: Arc<UdpSocket>) {
    // Shorter than a header: nothing to answer. A response: never answer
    // (reflection loops).
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return;
    }
    let (id, flags) = ([query[0], query[1]], query[2]);
    match Request::from_bytes(query, src, Protocol::Udp) {
        Ok(request) => {
            let reply = UdpReply { sock, dst: src };
            handler
                .handle_request::<_, TokioTime>(&request, reply)
                .await;
        }
        Err(e) => {
            tracing::debug!(error = %e, %src, "malformed DNS query");
            metrics::counter!("causeway_dns_queries_total", "rcode" => "formerr").increment(1);
            // FORMERR: the id, QR, the opcode and RD echoed, no sections.
            let mut r = [0u8; 12];
            r[..2].copy_from_slice(&id);
            r[2] = 0x80 | (flags & 0x79);
            r[3] = 1;
            let _ = sock.send_to(&r, src);
        }
    }
}

#[derive(Clone)]
struct UdpReply {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, buf) = encode_udp(response)?;
        self.sock.send_to(&buf, self.dst)?;
        Ok(info)
    }
}

/// Encodes an answer for UDP: at most 512 bytes without EDNS0, else the
/// OPT's size (which the handler already bounded); beyond it hickory
/// truncates and sets TC.
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let max = response.edns().map_or(512, |e| e.max_payload().max(512));
    let mut buf = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_max_size(max);
    let info = response.destructive_emit(&mut enc)?;
    Ok((info, buf))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Mutex;

    use causeway_api::catalog::CatalogView;
    use causeway_api::pb;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use proptest::prelude::*;

    use super::*;
    use crate::handler::ServeOptions;
    use crate::zone::ZoneOptions;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    #[async_trait::async_trait]
    impl ResponseHandler for Capture {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            let (info, buf) = encode_udp(response)?;
            *self.0.lock().unwrap() = buf;
            Ok(info)
        }
    }

    fn zone() -> Zone {
        let exports = (0..40)
            .map(|i| pb::Export {
                service: format!("shop/svc{i}"),
                ports: vec![pb::ServicePort {
                    port: 80,
                    protocol: "tcp".into(),
                    name: "http".into(),
                }],
                healthy_endpoints: 1,
                vip_index: i,
                ..Default::default()
            })
            .chain([pb::Export {
                service: "db/pg".into(),
                ports: vec![],
                healthy_endpoints: 60,
                headless: true,
                endpoints: (0..60)
                    .map(|i| pb::Endpoint {
                        address: format!("10.0.0.{i}"),
                        hostname: String::new(),
                    })
                    .collect(),
                ..Default::default()
            }])
            .collect();
        let v = CatalogView::from_snapshot(pb::CatalogSnapshot {
            revision: 1,
            sites: vec![pb::Site {
                name: "east".into(),
                available: true,
                ..Default::default()
            }],
            exports: vec![pb::SiteExports {
                site: "east".into(),
                exports,
            }],
            ..Default::default()
        });
        let opts = ZoneOptions {
            origin: "clusterset.local".into(),
            ttl: 5,
            negative_ttl: 5,
            vip_base: "127.10.0.0".parse().unwrap(),
            vip_prefix: 16,
        };
        Zone::build(&opts, &v).unwrap()
    }

    const NAMES: &[&str] = &[
        "svc3.shop.svc.clusterset.local.",
        "SVC7.Shop.svc.ClusterSet.local.",
        "svc39.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
        "shop.svc.clusterset.local.",
        "_tcp.svc1.shop.svc.clusterset.local.",
        "clusterset.local.",
        "dns-version.clusterset.local.",
        "pg.db.svc.clusterset.local.",
        "10-0-0-5.east.pg.db.svc.clusterset.local.",
        "a.b.c.d.e.clusterset.local.",
        "xclusterset.local.",
        "example.com.",
        "7.0.10.127.in-addr.arpa.",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whenever the fast path answers, it answers exactly what the
        /// general path does.
        #[test]
        fn the_fast_path_answers_like_the_general_path(
            name in 0..NAMES.len(),
            qtype in prop_oneof![
                Just(1u16), Just(28), Just(16), Just(6), Just(2), Just(12), Just(255), Just(33),
                any::<u16>()
            ],
            edns in proptest::option::of(prop_oneof![Just(512u16), Just(1232), Just(4096), Just(100), any::<u16>()]),
            rd in any::<bool>(),
            id in any::<u16>(),
        ) {
            let zone = Arc::new(zone());
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = rd;
            m.add_query(Query::query(Name::from_str(NAMES[name]).unwrap(), RecordType::from(qtype)));
            if let Some(size) = edns {
                let mut e = Edns::new();
                e.set_max_payload(size);
                m.set_edns(e);
            }
            let q = m.to_vec().unwrap();
            let mut out = Vec::new();
            let Some(len) = zone.wire.answer(&q, &mut out, 1232) else {
                return Ok(());
            };
            let fast = Message::from_vec(&out[..len]).unwrap();

            let (_tx, rx) = watch::channel(zone.clone());
            let handler = Handler::new(rx, ServeOptions::default());
            let capture = Capture::default();
            let request = Request::from_bytes(q, "127.0.0.1:5000".parse().unwrap(), Protocol::Udp).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(handler.handle_request::<_, TokioTime>(&request, capture.clone()));
            let general = Message::from_vec(&capture.0.lock().unwrap()).unwrap();

            prop_assert_eq!(&fast.metadata, &general.metadata);
            prop_assert_eq!(&fast.queries, &general.queries);
            prop_assert_eq!(&fast.answers, &general.answers);
            prop_assert_eq!(&fast.authorities, &general.authorities);
            prop_assert_eq!(&fast.additionals, &general.additionals);
            prop_assert_eq!(
                fast.edns.as_ref().map(|e| (e.max_payload(), e.version())),
                general.edns.as_ref().map(|e| (e.max_payload(), e.version()))
            );
        }
    }

    #[test]
    fn the_fast_path_takes_the_common_queries() {
        let zone = zone();
        let mut out = Vec::new();
        for (name, qtype, taken) in [
            ("svc3.shop.svc.clusterset.local.", RecordType::A, true),
            ("SVC3.shop.svc.clusterset.local.", RecordType::AAAA, true),
            ("nope.shop.svc.clusterset.local.", RecordType::A, true),
            // SRV (additionals), outside the zone, and an answer over 512
            // bytes without EDNS0 (truncation) take the general path.
            (
                "_http._tcp.svc3.shop.svc.clusterset.local.",
                RecordType::SRV,
                false,
            ),
            ("example.com.", RecordType::A, false),
            ("pg.db.svc.clusterset.local.", RecordType::A, false),
        ] {
            let mut m = Message::new(1, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
            let q = m.to_vec().unwrap();
            assert_eq!(
                zone.wire.answer(&q, &mut out, 1232).is_some(),
                taken,
                "{name} {qtype}"
            );
        }
    }
}

//! The hickory-server request handler: reads the current [`Zone`] snapshot
//! (an `Arc` swapped on each catalog change, so queries never wait on
//! updates) and answers.

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::{Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::zone::{Answer, Zone};

/// How the server answers, beyond the zone's contents.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where queries outside the zone go; empty: they are refused.
    pub upstreams: Vec<std::net::SocketAddr>,
    /// Largest UDP answer to an EDNS0 query (the client's own limit is
    /// honoured if smaller). Queries without EDNS0 get at most 512 bytes.
    /// A larger answer is truncated (TC) and the client retries over TCP.
    pub edns_udp_size: u16,
    /// Client networks whose out-of-zone queries are forwarded (`base`,
    /// prefix length); others are refused.
    pub forward_allow: Vec<(std::net::IpAddr, u8)>,
    /// Forwards in flight at once (each holds a socket); more get SERVFAIL.
    pub max_forwards: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            edns_udp_size: DEFAULT_EDNS_UDP_SIZE,
            forward_allow: vec![
                ("127.0.0.0".parse().expect("an address"), 8),
                ("::1".parse().expect("an address"), 128),
            ],
            max_forwards: DEFAULT_MAX_FORWARDS,
        }
    }
}

/// Forwards in flight at once by default.
pub const DEFAULT_MAX_FORWARDS: usize = 256;

/// Identical forwarded answers one client network (/24 or /56) gets per
/// second; past it they are dropped (response-rate limiting against
/// reflection).
pub const RRL_PER_SECOND: u32 = 20;

/// Whether `ip` is inside `net` (`base`, prefix length).
pub fn in_network(ip: std::net::IpAddr, (base, prefix): (std::net::IpAddr, u8)) -> bool {
    use std::net::IpAddr;
    match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let bits = u32::from(prefix.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let bits = u32::from(prefix.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Response-rate limiting: identical answers per client network per
/// second, bounded in memory.
#[derive(Default)]
struct RateLimit {
    /// The current second and, in it, answers per (client network, name).
    window: std::sync::Mutex<(u64, Counts)>,
}

/// Answers per (client network prefix, lowercased name).
type Counts = std::collections::HashMap<(Vec<u8>, String), u32>;

impl RateLimit {
    /// Whether one more answer for `name` to `client` may go out now.
    fn allow(&self, client: std::net::IpAddr, name: &str) -> bool {
        use causeway_api::sync::LockExt;
        let net = match client {
            std::net::IpAddr::V4(a) => a.octets()[..3].to_vec(),
            std::net::IpAddr::V6(a) => a.octets()[..7].to_vec(),
        };
        let second = causeway_api::clock::unix_ms() / 1000;
        let mut w = self.window.locked();
        if w.0 != second || w.1.len() > 65_536 {
            *w = (second, Default::default());
        }
        let n = w.1.entry((net, name.to_ascii_lowercase())).or_default();
        *n += 1;
        *n <= RRL_PER_SECOND
    }
}

/// The EDNS0 UDP payload size DNS Flag Day 2020 settled on: no IP
/// fragmentation on any common path.
pub const DEFAULT_EDNS_UDP_SIZE: u16 = 1232;

/// Answers one DNS query from the current zone (or forwards it upstream).
/// It knows no sockets: UDP and TCP serving hand it requests.
pub struct Handler {
    zone: watch::Receiver<Arc<Zone>>,
    opts: ServeOptions,
    forwards: Arc<tokio::sync::Semaphore>,
    rrl: RateLimit,
}

impl Handler {
    /// A handler over the live `zone`.
    pub fn new(zone: watch::Receiver<Arc<Zone>>, opts: ServeOptions) -> Self {
        let forwards = Arc::new(tokio::sync::Semaphore::new(opts.max_forwards.max(1)));
        Self {
            zone,
            opts,
            forwards,
            rrl: RateLimit::default(),
        }
    }
}

/// What became of an out-of-zone query.
enum Forwarded {
    Answer(Message),
    /// No upstream answered, or too many forwards are in flight.
    Failed,
    /// The client may not use this server as a resolver.
    NotAllowed,
    /// Identical answers to this client's network went out too often.
    Limited,
}

/// Largest upstream answer accepted (EDNS0 UDP payloads rarely exceed 4096).
const MAX_UPSTREAM_REPLY: usize = 4096;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends the client's query, as it came, to each upstream in turn until one
/// answers with a well-formed reply to this query.
async fn forward(upstreams: &[std::net::SocketAddr], query: &[u8]) -> Option<Message> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    for up in upstreams {
        let local = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let attempt = async {
            let sock = UdpSocket::bind(local).await.ok()?;
            sock.connect(up).await.ok()?;
            sock.send(query).await.ok()?;
            let mut buf = vec![0u8; MAX_UPSTREAM_REPLY];
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                match Message::from_vec(&buf[..n]) {
                    Ok(m) if m.metadata.id == id => return Some(m),
                    _ => continue, // not ours, or garbage: keep waiting
                }
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Some(m)) => {
                metrics::counter!("causeway_dns_forwarded_total", "result" => "ok").increment(1);
                return Some(m);
            }
            _ => {
                metrics::counter!("causeway_dns_forwarded_total", "result" => "error").increment(1);
                tracing::debug!(upstream = %up, "upstream did not answer");
            }
        }
    }
    None
}

impl Handler {
    /// Forwards an out-of-zone query for an allowed client, within the
    /// bound on forwards in flight and the rate limit on identical answers.
    async fn forward(&self, request: &Request, name: &str) -> Forwarded {
        let client = request.src().ip();
        if !self
            .opts
            .forward_allow
            .iter()
            .any(|n| in_network(client, *n))
        {
            metrics::counter!("causeway_dns_forwarded_total", "result" => "not_allowed")
                .increment(1);
            return Forwarded::NotAllowed;
        }
        let Ok(_slot) = self.forwards.clone().try_acquire_owned() else {
            metrics::counter!("causeway_dns_forwarded_total", "result" => "busy").increment(1);
            return Forwarded::Failed;
        };
        match forward(&self.opts.upstreams, request.as_slice()).await {
            Some(m) if !self.rrl.allow(client, name) => {
                drop(m);
                Forwarded::Limited
            }
            Some(m) => Forwarded::Answer(m),
            None => Forwarded::Failed,
        }
    }
}

fn count(code: ResponseCode) {
    let label = match code {
        ResponseCode::NoError => "noerror",
        ResponseCode::NXDomain => "nxdomain",
        ResponseCode::Refused => "refused",
        ResponseCode::ServFail => "servfail",
        ResponseCode::FormErr => "formerr",
        ResponseCode::NotImp => "notimp",
        ResponseCode::BADVERS => "badvers",
        _ => "other",
    };
    metrics::counter!("causeway_dns_queries_total", "rcode" => label).increment(1);
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let fallback = {
            let mut m = Metadata::response_from_request(&request.metadata);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: m,
                counts: HeaderCounts::default(),
            })
        };
        let mut builder = MessageResponseBuilder::from_message_request(request);
        // EDNS0: answer an OPT with an OPT, whose payload size also bounds
        // this answer over UDP (hickory truncates and sets TC beyond it).
        let resp_edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(
                req.max_payload()
                    .clamp(512, self.opts.edns_udp_size.max(512)),
            );
            e.set_version(0);
            e
        });
        if let Some(req) = request.edns.as_ref().filter(|e| e.version() > 0) {
            // Only version 0 exists (RFC 6891 section 6.1.3).
            tracing::debug!(version = req.version(), "EDNS version not supported");
            let mut e = resp_edns.clone().expect("request has EDNS");
            e.set_rcode_high(ResponseCode::BADVERS.high());
            count(ResponseCode::BADVERS);
            let resp = MessageResponseBuilder::new(&request.queries, Some(&e))
                .error_msg(&request.metadata, ResponseCode::BADVERS);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or(fallback);
        }
        if let Some(e) = &resp_edns {
            builder.edns(e);
        }
        if request.metadata.message_type == MessageType::Response {
            // Never answer an answer (reflection loops between servers).
            metrics::counter!("causeway_dns_dropped_total", "why" => "response").increment(1);
            return fallback;
        }
        if request.metadata.op_code != OpCode::Query {
            count(ResponseCode::NotImp);
            let resp = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or(fallback);
        }
        let Ok(info) = request.request_info() else {
            count(ResponseCode::FormErr);
            let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or(fallback);
        };
        let zone = self.zone.borrow().clone();
        if !zone.ready {
            count(ResponseCode::ServFail);
            let resp = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return response_handle
                .send_response(resp)
                .await
                .unwrap_or(fallback);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        meta.recursion_available = false;
        let name = info.query.name();
        let qtype = info.query.query_type();
        let soa = std::slice::from_ref(zone.soa());
        let none: &[Record] = &[];
        let mut extra: Vec<Record> = Vec::new();
        let upstream: Message;
        let resp = match zone.answer(name, qtype) {
            Answer::Records(r) => {
                meta.response_code = ResponseCode::NoError;
                // SRV answers carry their targets' addresses, saving a
                // round trip (the targets are in this zone).
                for rec in r {
                    if let hickory_proto::rr::RData::SRV(srv) = &rec.data {
                        let target = hickory_proto::rr::LowerName::from(&srv.target);
                        for t in [RecordType::A, RecordType::AAAA] {
                            if let Answer::Records(a) = zone.answer(&target, t) {
                                extra.extend(a.iter().cloned());
                            }
                        }
                    }
                }
                builder.build(meta, r.iter(), none.iter(), none.iter(), extra.iter())
            }
            Answer::NoData => {
                meta.response_code = ResponseCode::NoError;
                builder.build(meta, none.iter(), none.iter(), soa.iter(), none.iter())
            }
            Answer::NxDomain => {
                meta.response_code = ResponseCode::NXDomain;
                builder.build(meta, none.iter(), none.iter(), soa.iter(), none.iter())
            }
            Answer::Refused if !self.opts.upstreams.is_empty() => {
                meta.authoritative = false;
                match self.forward(request, &name.to_string()).await {
                    Forwarded::Limited => {
                        metrics::counter!("causeway_dns_dropped_total", "why" => "rate")
                            .increment(1);
                        return fallback;
                    }
                    Forwarded::NotAllowed => {
                        meta.response_code = ResponseCode::Refused;
                        builder.build(meta, none.iter(), none.iter(), none.iter(), none.iter())
                    }
                    Forwarded::Answer(m) => {
                        upstream = m;
                        meta.response_code = upstream.metadata.response_code;
                        meta.recursion_available = upstream.metadata.recursion_available;
                        meta.truncation = upstream.metadata.truncation;
                        builder.build(
                            meta,
                            upstream.answers.iter(),
                            upstream.authorities.iter(),
                            none.iter(),
                            upstream.additionals.iter(),
                        )
                    }
                    Forwarded::Failed => {
                        meta.response_code = ResponseCode::ServFail;
                        builder.build(meta, none.iter(), none.iter(), none.iter(), none.iter())
                    }
                }
            }
            Answer::Refused => {
                meta.authoritative = false;
                meta.response_code = ResponseCode::Refused;
                builder.build(meta, none.iter(), none.iter(), none.iter(), none.iter())
            }
        };
        count(meta.response_code);
        response_handle
            .send_response(resp)
            .await
            .unwrap_or(fallback)
    }
}

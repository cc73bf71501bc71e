//! DNS server configuration: the human form ([`DnsConfig`], from the
//! command-line flags) and its validated form ([`DnsSettings`]). Every
//! problem is reported at once, each naming its field.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_api::config::ConfigErrors;

use crate::handler::{ServeOptions, DEFAULT_EDNS_UDP_SIZE, DEFAULT_MAX_FORWARDS};
use crate::zone::ZoneOptions;

/// A DNS server's configuration as given.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The site's state directory (written by the gateway when it joined).
    pub state_dir: PathBuf,
    /// UDP and TCP listen address.
    pub listen: String,
    /// The zone to serve.
    pub zone: String,
    /// Must equal the gateway's `vip_range`.
    pub vip_range: String,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// TTL of negative answers (SOA minimum), seconds.
    pub negative_ttl: u32,
    /// Admin (metrics) listen address.
    pub admin_listen: Option<String>,
    /// UDP sockets on the listen address (SO_REUSEPORT); 0: one per CPU.
    pub udp_sockets: usize,
    /// Resolvers for queries outside the zone (UDP, `ip:port`).
    pub upstream: Vec<String>,
    /// Largest UDP answer to an EDNS0 query, bytes (512-4096).
    pub edns_udp_size: u16,
    /// Client networks whose out-of-zone queries are forwarded (CIDRs);
    /// empty: loopback and `vip_range`. Others are refused.
    pub forward_allow: Vec<String>,
    /// Forwards in flight at once; more are answered SERVFAIL at once.
    pub max_forwards: usize,
}

/// The config file's form (TOML): the flags' fields, `state_dir`
/// required, the rest optional; unknown fields refused.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: PathBuf,
    listen: Option<String>,
    zone: Option<String>,
    vip_range: Option<String>,
    ttl: Option<u32>,
    negative_ttl: Option<u32>,
    admin_listen: Option<String>,
    udp_sockets: Option<usize>,
    #[serde(default)]
    upstream: Vec<String>,
    edns_udp_size: Option<u16>,
    #[serde(default)]
    forward_allow: Vec<String>,
    max_forwards: Option<usize>,
}

impl DnsConfig {
    /// A config file (`causeway dns --config`): the flags' fields in TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigErrors::toml("", e))?;
        let mut c = Self::new(f.state_dir);
        if let Some(v) = f.listen {
            c.listen = v;
        }
        if let Some(v) = f.zone {
            c.zone = v;
        }
        if let Some(v) = f.vip_range {
            c.vip_range = v;
        }
        if let Some(v) = f.ttl {
            c.ttl = v;
        }
        if let Some(v) = f.negative_ttl {
            c.negative_ttl = v;
        }
        c.admin_listen = f.admin_listen;
        if let Some(v) = f.udp_sockets {
            c.udp_sockets = v;
        }
        c.upstream = f.upstream;
        if let Some(v) = f.edns_udp_size {
            c.edns_udp_size = v;
        }
        c.forward_allow = f.forward_allow;
        if let Some(v) = f.max_forwards {
            c.max_forwards = v;
        }
        Ok(c)
    }

    /// The defaults of everything but the state directory.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            listen: "127.0.0.1:5353".into(),
            zone: "clusterset.local".into(),
            vip_range: "127.10.0.0/16".into(),
            ttl: 5,
            negative_ttl: 5,
            admin_listen: None,
            udp_sockets: 0,
            upstream: Vec::new(),
            edns_udp_size: DEFAULT_EDNS_UDP_SIZE,
            forward_allow: Vec::new(),
            max_forwards: DEFAULT_MAX_FORWARDS,
        }
    }
}

/// A DNS server's validated settings.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The site's state directory.
    pub state_dir: PathBuf,
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// Admin (metrics) listen address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// UDP sockets to bind (at least 1).
    pub udp_sockets: usize,
    /// What the zone is built with.
    pub zone: ZoneOptions,
    /// How queries are answered.
    pub serve: ServeOptions,
}

impl DnsConfig {
    /// Checks every field; all problems at once.
    pub fn validate(&self) -> Result<DnsSettings, ConfigErrors> {
        let mut errs = ConfigErrors::new();
        let listen = errs.addr("listen", &self.listen);
        let admin_listen = self
            .admin_listen
            .as_deref()
            .and_then(|a| errs.addr("admin_listen", a));
        let vip = causeway_api::model::parse_cidr("vip_range", &self.vip_range)
            .map_err(|e| errs.push("vip_range", e))
            .ok();
        if hickory_proto::rr::Name::from_ascii(&self.zone).is_err() || self.zone.is_empty() {
            errs.push("zone", format!("{:?} is not a DNS name", self.zone));
        }
        let mut upstreams = Vec::new();
        for (i, u) in self.upstream.iter().enumerate() {
            match u.parse::<SocketAddr>() {
                Ok(a) if listen.is_some_and(|l| is_self(l, a)) => errs.push(
                    &format!("upstream[{i}]"),
                    format!("{u:?} is this server's own listen address: queries would loop; give a resolver"),
                ),
                Ok(a) => upstreams.push(a),
                Err(_) => errs.push(
                    &format!("upstream[{i}]"),
                    format!("{u:?} is not an ip:port address (e.g. 10.96.0.10:53)"),
                ),
            }
        }
        if !(512..=4096).contains(&self.edns_udp_size) {
            errs.push(
                "edns_udp_size",
                format!(
                    "{} is outside 512-4096 (1232 avoids IP fragmentation)",
                    self.edns_udp_size
                ),
            );
        }
        let mut forward_allow = Vec::new();
        for (i, c) in self.forward_allow.iter().enumerate() {
            match causeway_api::model::parse_cidr("forward_allow", c) {
                Ok(n) => forward_allow.push(n),
                Err(e) => errs.push(&format!("forward_allow[{i}]"), e),
            }
        }
        if forward_allow.is_empty() {
            forward_allow.push(("127.0.0.0".parse().expect("an address"), 8));
            forward_allow.push(("::1".parse().expect("an address"), 128));
            if let Some(v) = vip {
                forward_allow.push(v);
            }
        }
        if !(1..=65536).contains(&self.max_forwards) {
            errs.push(
                "max_forwards",
                format!("{} must be 1-65536", self.max_forwards),
            );
        }
        let udp_sockets = match self.udp_sockets {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.min(64),
        };
        errs.into_result(|| {
            let (vip_base, vip_prefix) = vip.expect("checked");
            DnsSettings {
                state_dir: self.state_dir.clone(),
                listen: listen.expect("checked"),
                admin_listen,
                udp_sockets,
                zone: ZoneOptions {
                    origin: self.zone.clone(),
                    ttl: self.ttl,
                    negative_ttl: self.negative_ttl,
                    vip_base,
                    vip_prefix,
                },
                serve: ServeOptions {
                    upstreams,
                    edns_udp_size: self.edns_udp_size,
                    forward_allow,
                    max_forwards: self.max_forwards,
                },
            }
        })
    }
}

/// Whether a query sent to `upstream` would come back to a server
/// listening on `listen`.
fn is_self(listen: SocketAddr, upstream: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip()
            || (listen.ip().is_unspecified()
                && (upstream.ip().is_loopback() || upstream.ip().is_unspecified())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut cfg = DnsConfig::new("/s".into());
        cfg.listen = "x".into();
        cfg.vip_range = "10.0.0.0/99".into();
        cfg.zone = "bad zone..".into();
        cfg.upstream = vec!["10.96.0.10:53".into(), "nope".into()];
        cfg.edns_udp_size = 100;
        cfg.admin_listen = Some("y".into());
        let errs = cfg.validate().unwrap_err().0;
        for want in [
            "listen: \"x\"",
            "admin_listen: \"y\"",
            "vip_range: ",
            "zone: ",
            "upstream[1]: \"nope\"",
            "edns_udp_size: 100 is outside 512-4096",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{want:?} not in {errs:?}"
            );
        }
        assert_eq!(errs.len(), 6, "{errs:?}");
    }

    #[test]
    fn the_defaults_are_valid() {
        let s = DnsConfig::new("/s".into()).validate().unwrap();
        assert_eq!(s.listen, "127.0.0.1:5353".parse().unwrap());
        assert!(s.udp_sockets >= 1);
        assert_eq!(s.serve.edns_udp_size, DEFAULT_EDNS_UDP_SIZE);
        // Forwarding is open to loopback and the VIP range only.
        let allow = &s.serve.forward_allow;
        let allowed = |ip: &str| {
            allow
                .iter()
                .any(|n| crate::handler::in_network(ip.parse().unwrap(), *n))
        };
        assert!(allowed("127.0.0.1") && allowed("::1") && allowed("127.10.3.4"));
        assert!(!allowed("10.1.2.3") && !allowed("192.168.0.1"));
    }

    #[test]
    fn an_upstream_that_is_this_server_is_refused() {
        for (listen, upstream) in [
            ("127.0.0.1:5353", "127.0.0.1:5353"),
            ("0.0.0.0:5353", "127.0.0.1:5353"),
            ("0.0.0.0:5353", "0.0.0.0:5353"),
        ] {
            let mut cfg = DnsConfig::new("/s".into());
            cfg.listen = listen.into();
            cfg.upstream = vec![upstream.into()];
            let errs = cfg.validate().unwrap_err().0;
            assert!(
                errs[0].contains("own listen address: queries would loop"),
                "{errs:?}"
            );
        }
        let mut cfg = DnsConfig::new("/s".into());
        cfg.listen = "0.0.0.0:5353".into();
        cfg.upstream = vec!["127.0.0.1:53".into(), "10.96.0.10:5353".into()];
        assert!(cfg.validate().is_ok());
        cfg.forward_allow = vec!["10.0.0.0/33".into()];
        cfg.max_forwards = 0;
        let errs = cfg.validate().unwrap_err().0;
        assert!(errs[0].starts_with("forward_allow[0]:"), "{errs:?}");
        assert!(errs[1].starts_with("max_forwards: 0"), "{errs:?}");
    }
}

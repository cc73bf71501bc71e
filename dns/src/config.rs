//! DNS server configuration: the human form ([`DnsConfig`], from the
//! command-line flags) and its validated form ([`DnsSettings`]). Every
//! problem is reported at once, each naming its field.

use std::net::SocketAddr;
use std::path::PathBuf;

use causeway_api::config::ConfigErrors;

use crate::handler::{ServeOptions, DEFAULT_EDNS_UDP_SIZE};
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
}

impl DnsConfig {
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
                },
            }
        })
    }
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
    }
}

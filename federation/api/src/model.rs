//! Domain newtypes. Every name that crosses a process boundary is parsed into
//! one of these first, so an invalid value is refused at the edge with an
//! error that names the field and the rule.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Maximum length of one DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A name that breaks its rule, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {rule}")]
pub struct InvalidName {
    /// The field or argument that held it.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What a valid value looks like.
    pub rule: &'static str,
}

fn invalid(field: &'static str, value: &str, rule: &'static str) -> InvalidName {
    let mut value = value.to_string();
    value.truncate(80);
    InvalidName { field, value, rule }
}

/// Checks a label value (Kubernetes rules, e.g. a zone such as
/// `us-east-1a`): at most 63 characters of letters, digits, '-', '_' and
/// '.', starting and ending with a letter or digit; empty is allowed.
pub fn check_label_value(field: &'static str, s: &str) -> Result<(), InvalidName> {
    const RULE: &str = "must be a label value: at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit";
    if s.is_empty() {
        return Ok(());
    }
    let b = s.as_bytes();
    let ok = s.len() <= MAX_LABEL_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(field, s, RULE))
    }
}

/// Checks an RFC 1123 DNS label: 1-63 chars of `[a-z0-9-]`, starting and
/// ending with an alphanumeric. This is also what Kubernetes requires of
/// namespace and service names.
pub fn check_dns_label(field: &'static str, s: &str) -> Result<(), InvalidName> {
    const RULE: &str = "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";
    if s.is_empty() || s.len() > MAX_LABEL_LEN {
        return Err(invalid(field, s, RULE));
    }
    let b = s.as_bytes();
    let ok_inner = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    let ok_ends = b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric();
    if ok_inner && ok_ends {
        Ok(())
    } else {
        Err(invalid(field, s, RULE))
    }
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                s.parse()
            }
        }
    };
}

string_newtype!(
    /// A site (cluster) name: a DNS label, unique in the federation.
    SiteName
);

impl FromStr for SiteName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        check_dns_label("site name", s)?;
        Ok(Self(s.to_string()))
    }
}

impl SiteName {
    /// The trust domain a site's gateways use. Derived from the site name so
    /// that no site can claim another site's trust domain.
    pub fn trust_domain(&self, suffix: &str) -> TrustDomain {
        TrustDomain(format!("{}.{}", self.0, suffix))
    }
}

string_newtype!(
    /// `<namespace>/<name>`, both DNS labels (the MCS service key).
    ServiceKey
);

impl FromStr for ServiceKey {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        let Some((ns, name)) = s.split_once('/') else {
            return Err(invalid(
                "service key",
                s,
                "must be '<namespace>/<name>', e.g. 'shop/payments'",
            ));
        };
        check_dns_label("service namespace", ns)?;
        check_dns_label("service name", name)?;
        Ok(Self(s.to_string()))
    }
}

impl ServiceKey {
    /// The namespace part.
    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map(|(ns, _)| ns).unwrap_or_default()
    }

    /// The name part.
    pub fn name(&self) -> &str {
        self.0.split_once('/').map(|(_, n)| n).unwrap_or_default()
    }

    /// `<name>.<namespace>.svc.<zone>` (MCS DNS spec, ClusterSetIP services).
    pub fn dns_name(&self, zone: &str) -> String {
        format!("{}.{}.svc.{}", self.name(), self.namespace(), zone)
    }
}

string_newtype!(
    /// A SPIFFE trust domain (lowercase letters, digits, '.', '-', '_').
    TrustDomain
);

impl FromStr for TrustDomain {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(invalid(
                "trust domain",
                s,
                "must be 1-255 characters of a-z, 0-9, '.', '-' and '_'",
            ))
        }
    }
}

/// `spiffe://<trust-domain>/<path>`, parsed strictly (SPIFFE-ID §2): lower-case
/// trust domain, a non-empty path of non-empty segments without '.' or '..',
/// no percent-encoding, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// The ID `spiffe://<trust_domain><path>`; `path` starts with `/`.
    pub fn new(trust_domain: TrustDomain, path: &str) -> Result<Self, InvalidName> {
        format!("spiffe://{trust_domain}{path}").parse()
    }

    /// The trust domain it belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, starting with '/'.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Path segments, without the leading empty one.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path[1..].split('/')
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        const FIELD: &str = "SPIFFE ID";
        if s.len() > 2048 {
            return Err(invalid(FIELD, s, "longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid(FIELD, s, "must start with 'spiffe://'"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(invalid(FIELD, s, "must have a path after the trust domain")),
        };
        let trust_domain: TrustDomain = td.parse()?;
        let segs_ok = path.len() > 1
            && path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
            });
        if !segs_ok {
            return Err(invalid(
                FIELD,
                s,
                "path segments must be non-empty, not '.' or '..', and use only letters, digits, '.', '-' and '_'",
            ));
        }
        Ok(Self {
            trust_domain,
            path: path.to_string(),
        })
    }
}

/// A catalog revision: bumped by every applied change, never goes backwards.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Service protocol: `tcp` ports are forwarded per connection, `http` and
/// `http2` ports per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Raw TCP; forwarded per connection (the default).
    #[default]
    Tcp,
    /// HTTP/1.1 towards the endpoints; routed per request.
    Http,
    /// HTTP/2 without TLS towards the endpoints (prior knowledge, as gRPC
    /// servers speak it); routed per request.
    Http2,
}

impl Protocol {
    /// The name used in configs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
        }
    }

    /// Whether the gateways route this port per request.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2)
    }
}

impl FromStr for Protocol {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            _ => Err(invalid(
                "protocol",
                s,
                "must be 'tcp', 'http' (HTTP/1.1 endpoints) or 'http2' (HTTP/2 endpoints without TLS, e.g. gRPC)",
            )),
        }
    }
}

/// Most ports one export may list; also how many listener ports each
/// imported service gets on a gateway pod ([`import_port`]).
pub const MAX_PORTS_PER_SERVICE: usize = 32;

/// On Kubernetes, where a gateway pod has one address, the port its
/// outbound listener for an imported service's port uses: the service's
/// block of [`MAX_PORTS_PER_SERVICE`] ports from `base` (blocks in
/// `vip_index` order), at the port's position among the service's ports
/// sorted by number. The agent writes the same number into the derived
/// EndpointSlices. `None` when the index or position falls outside
/// the port space.
pub fn import_port(base: u16, vip_index: u32, position: usize) -> Option<u16> {
    if vip_index == 0 || position >= MAX_PORTS_PER_SERVICE {
        return None;
    }
    let port =
        u64::from(base) + u64::from(vip_index - 1) * MAX_PORTS_PER_SERVICE as u64 + position as u64;
    u16::try_from(port).ok()
}

/// The outbound address for the service with `vip_index` inside `cidr`
/// (`base/prefix`). Index 0 is never assigned, so the network address stays
/// free. Returns `None` when the index does not fit in the range.
pub fn vip_for(base: IpAddr, prefix: u8, vip_index: u32) -> Option<IpAddr> {
    if vip_index == 0 {
        return None;
    }
    match base {
        IpAddr::V4(b) => {
            let host_bits = 32u32.checked_sub(prefix as u32)?;
            if host_bits < 32 && (vip_index as u64) >= (1u64 << host_bits) {
                return None;
            }
            let mask = if host_bits >= 32 {
                0
            } else {
                u32::MAX << host_bits
            };
            let net = u32::from(b) & mask;
            Some(IpAddr::V4(Ipv4Addr::from(net | vip_index)))
        }
        IpAddr::V6(b) => {
            let host_bits = 128u32.checked_sub(prefix as u32)?;
            if host_bits < 32 && (vip_index as u64) >= (1u64 << host_bits) {
                return None;
            }
            let mask = if host_bits >= 128 {
                0
            } else {
                u128::MAX << host_bits
            };
            let net = u128::from(b) & mask;
            Some(IpAddr::V6(Ipv6Addr::from(net | vip_index as u128)))
        }
    }
}

/// Parses `a.b.c.d/n` or `x::y/n`.
pub fn parse_cidr(field: &'static str, s: &str) -> Result<(IpAddr, u8), InvalidName> {
    const RULE: &str = "must be an address range like '127.10.0.0/16'";
    let (a, p) = s.split_once('/').ok_or_else(|| invalid(field, s, RULE))?;
    let addr: IpAddr = a.parse().map_err(|_| invalid(field, s, RULE))?;
    let prefix: u8 = p.parse().map_err(|_| invalid(field, s, RULE))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max || prefix + 2 > max {
        return Err(invalid(field, s, "prefix leaves no room for addresses"));
    }
    Ok((addr, prefix))
}

/// Largest weight a tunnel address may carry.
pub const MAX_TUNNEL_WEIGHT: u32 = 100;

/// One gateway replica's tunnel address and its share of new streams:
/// `ip:port`, or `ip:port;weight=N` (1 ≤ N ≤ 100, default 1). Replicas of a
/// site each get at least one pooled connection; streams are spread across
/// them by weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelAddr {
    /// Where the replica's tunnel endpoint listens for other sites.
    pub addr: std::net::SocketAddr,
    /// Its share of new streams (1-100).
    pub weight: u32,
}

impl FromStr for TunnelAddr {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const RULE: &str = "must be ip:port or ip:port;weight=N with 1 <= N <= 100";
        let (a, w) = match s.split_once(';') {
            Some((a, w)) => (a, Some(w)),
            None => (s, None),
        };
        let addr = a.parse().map_err(|_| invalid("tunnel address", s, RULE))?;
        let weight = match w {
            None => 1,
            Some(w) => w
                .strip_prefix("weight=")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=MAX_TUNNEL_WEIGHT).contains(n))
                .ok_or_else(|| invalid("tunnel address", s, RULE))?,
        };
        Ok(Self { addr, weight })
    }
}

impl fmt::Display for TunnelAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{};weight={}", self.addr, self.weight)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_ports_are_blocks_per_service_in_index_order() {
        assert_eq!(import_port(20000, 1, 0), Some(20000));
        assert_eq!(import_port(20000, 1, 31), Some(20031));
        assert_eq!(import_port(20000, 2, 0), Some(20032));
        assert_eq!(import_port(20000, 3, 2), Some(20066));
        assert_eq!(import_port(20000, 0, 0), None, "index 0 is never assigned");
        assert_eq!(import_port(20000, 1, 32), None, "a block has 32 ports");
        // 65535 - 20000 = 45535 = 1422 blocks of 32 + 31.
        assert_eq!(import_port(20000, 1423, 31), Some(65535));
        assert_eq!(import_port(20000, 1424, 0), None);
    }

    #[test]
    fn tunnel_addresses_carry_an_optional_weight() {
        let a: TunnelAddr = "10.0.0.1:4433".parse().unwrap();
        assert_eq!((a.addr.port(), a.weight), (4433, 1));
        assert_eq!(a.to_string(), "10.0.0.1:4433");
        let b: TunnelAddr = "[::1]:4433;weight=3".parse().unwrap();
        assert_eq!(b.weight, 3);
        assert_eq!(b.to_string(), "[::1]:4433;weight=3");
        assert_eq!(b.to_string().parse::<TunnelAddr>().unwrap(), b);
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:4433;weight=0",
            "10.0.0.1:4433;weight=101",
            "10.0.0.1:4433;w=2",
            "10.0.0.1:4433;weight=",
            "host:4433",
        ] {
            let e = bad.parse::<TunnelAddr>().unwrap_err();
            assert_eq!(e.field, "tunnel address", "{bad}");
        }
    }

    #[test]
    fn site_names_follow_dns_label_rules() {
        assert!("east".parse::<SiteName>().is_ok());
        assert!("eu-west-1".parse::<SiteName>().is_ok());
        for bad in ["", "East", "-a", "a-", "a_b", "a.b", &"x".repeat(64)] {
            let err = bad.parse::<SiteName>().unwrap_err();
            assert_eq!(err.field, "site name", "{bad}");
        }
    }

    #[test]
    fn service_keys_need_namespace_and_name() {
        let k: ServiceKey = "shop/payments".parse().unwrap();
        assert_eq!(k.namespace(), "shop");
        assert_eq!(k.name(), "payments");
        assert_eq!(
            k.dns_name("clusterset.local"),
            "payments.shop.svc.clusterset.local"
        );
        assert!("payments".parse::<ServiceKey>().is_err());
        assert!("shop/".parse::<ServiceKey>().is_err());
        assert!("Shop/payments".parse::<ServiceKey>().is_err());
        assert!("a/b/c".parse::<ServiceKey>().is_err());
    }

    #[test]
    fn spiffe_ids_are_strict() {
        let id: SpiffeId = "spiffe://east.causeway/gateway/0".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "east.causeway");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["gateway", "0"]);
        for bad in [
            "spiffe://east.causeway",
            "spiffe://east.causeway/",
            "spiffe://East.causeway/gw",
            "spiffe://east.causeway//gw",
            "spiffe://east.causeway/a/../b",
            "spiffe://east.causeway/a%2Fb",
            "spiffe://east.causeway/a?x=1",
            "https://east.causeway/gw",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vips_map_into_the_range() {
        let (b, p) = parse_cidr("vip range", "127.10.0.0/16").unwrap();
        assert_eq!(vip_for(b, p, 1).unwrap().to_string(), "127.10.0.1");
        assert_eq!(vip_for(b, p, 258).unwrap().to_string(), "127.10.1.2");
        assert_eq!(vip_for(b, p, 0), None);
        assert_eq!(vip_for(b, p, 65536), None);
        let (b, p) = parse_cidr("vip range", "fd00::/64").unwrap();
        assert_eq!(vip_for(b, p, 5).unwrap().to_string(), "fd00::5");
        assert!(parse_cidr("vip range", "127.0.0.1").is_err());
        assert!(parse_cidr("vip range", "127.0.0.0/31").is_err());
    }
}

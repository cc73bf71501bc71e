//! Gateway configuration: the human TOML (`GatewayConfig`, unknown fields
//! refused) and its validated form (`Settings`). All problems are reported
//! at once, each naming its field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use causeway_api::model::{parse_cidr, Protocol, ServiceKey, TunnelAddr};
use serde::{Deserialize, Serialize};

/// A gateway's configuration as written (TOML; unknown fields refused).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the site's keys and credentials live.
    pub state_dir: PathBuf,
    /// UDP address of the QUIC tunnel endpoint.
    #[serde(default = "default_tunnel_listen")]
    pub tunnel_listen: String,
    /// Addresses other sites dial, one per gateway replica of this site:
    /// `ip:port` or `ip:port;weight=N` (streams are spread by weight).
    /// Defaults to `tunnel_listen`. Every replica lists all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnel_advertise: Vec<String>,
    /// Range for outbound listeners of imported services.
    #[serde(default = "default_vip_range")]
    pub vip_range: String,
    /// Replica name, the last segment of the gateway's SPIFFE ID.
    #[serde(default = "default_replica")]
    pub replica: String,
    /// Optional existing site CA (PEM files); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_ca_cert: Option<PathBuf>,
    /// The site CA's private key (PEM), with `site_ca_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_ca_key: Option<PathBuf>,
    /// Seconds between local health checks and export publications.
    #[serde(default = "default_health_interval")]
    pub health_interval_secs: f64,
    /// How each stream picks a local endpoint: p2c_ewma (default),
    /// round_robin, least_request or weighted.
    #[serde(default = "default_balancer")]
    pub balancer: String,
    /// On SIGTERM, how long streams in flight may take to finish.
    #[serde(default = "default_drain")]
    pub drain_secs: f64,
    /// Bind outbound listeners with SO_REUSEPORT, so another gateway of
    /// this site on the same host — a second replica, or the next release
    /// started before this one drains (a surge upgrade) — serves the same
    /// VIPs, the kernel spreading new connections over both. Off by
    /// default: then a second process on the range fails to bind and says
    /// so. Both processes must set it and run as the same user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_listeners: bool,
    /// When a peer site's bundle drops the CA a live tunnel was
    /// authenticated with, how long that tunnel keeps carrying the streams
    /// it has (it takes no new ones) before it is closed. Default 10 s.
    #[serde(default = "default_retire_grace")]
    pub retire_grace_secs: f64,
    /// Lifetime of this replica's tunnel certificate (issued by the site
    /// CA at start); it is renewed in place at two thirds of it, and on
    /// SIGHUP, without dropping tunnels. Default one day.
    #[serde(default = "default_cert_ttl")]
    pub cert_ttl_secs: f64,
    /// Who may call this site's exports: "allow_members" (default: any
    /// member site, narrowed per service by `allow` rules) or "deny" (only
    /// what an `allow` rule lists).
    #[serde(default = "default_authorization")]
    pub authorization: String,
    /// Runtime threads: 0 (default) is one per CPU the process may use (a
    /// CPU quota counts); 1 runs everything on one thread (no cross-thread
    /// wake-ups: less CPU per request where the gateway has about one CPU),
    /// which is also what the default gives a process limited to one CPU.
    #[serde(default)]
    pub worker_threads: usize,
    /// Per-service allow rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AllowConfig>,
    /// QUIC tuning for the links between sites.
    #[serde(default)]
    pub quic: QuicConfig,
    /// Bounds on what one client may hold: timeouts and connection caps.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// One JSON line per request or connection.
    #[serde(default)]
    pub access_log: crate::access::AccessLogConfig,
    /// Distributed tracing over OTLP.
    #[serde(default)]
    pub tracing: crate::trace::TracingConfig,
    /// Services this site exports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportConfig>,
    /// Run as a Kubernetes site's gateway: exports come from the cluster's
    /// ServiceExports, imports are served on the pod's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
    /// A TLS listener for clients outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<crate::ingress::IngressConfig>,
}

/// `[limits]`: what one client may hold of a gateway.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Seconds an HTTP client has to send a request's headers (slowloris).
    pub http_header_timeout_secs: f64,
    /// Seconds an HTTP client has to send a request's body.
    pub http_body_timeout_secs: f64,
    /// Seconds an L4 connection (or tunnel stream) may carry no byte in
    /// either direction before it is closed.
    pub idle_timeout_secs: f64,
    /// Connections one outbound listener serves at once; more are closed
    /// on accept (and counted).
    pub max_connections_per_listener: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            http_header_timeout_secs: 10.0,
            http_body_timeout_secs: 30.0,
            idle_timeout_secs: 3600.0,
            max_connections_per_listener: 10_000,
        }
    }
}

/// Validated limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`LimitsConfig::http_header_timeout_secs`].
    pub http_header_timeout: Duration,
    /// See [`LimitsConfig::http_body_timeout_secs`].
    pub http_body_timeout: Duration,
    /// See [`LimitsConfig::idle_timeout_secs`].
    pub idle_timeout: Duration,
    /// See [`LimitsConfig::max_connections_per_listener`].
    pub max_connections_per_listener: usize,
}

impl Default for Limits {
    fn default() -> Self {
        LimitsConfig::default()
            .validate(&mut Vec::new())
            .expect("the defaults are valid")
    }
}

impl LimitsConfig {
    fn validate(&self, errs: &mut Vec<String>) -> Option<Limits> {
        let mut secs = |name: &str, v: f64, min: f64, max: f64| {
            if v >= min && v <= max {
                Some(Duration::from_secs_f64(v))
            } else {
                errs.push(format!(
                    "limits.{name}: {v} must be between {min} and {max} seconds"
                ));
                None
            }
        };
        let header = secs(
            "http_header_timeout_secs",
            self.http_header_timeout_secs,
            0.1,
            600.0,
        );
        let body = secs(
            "http_body_timeout_secs",
            self.http_body_timeout_secs,
            0.1,
            3600.0,
        );
        let idle = secs(
            "idle_timeout_secs",
            self.idle_timeout_secs,
            0.1,
            7.0 * 86400.0,
        );
        if !(1..=1_000_000).contains(&self.max_connections_per_listener) {
            errs.push(format!(
                "limits.max_connections_per_listener: {} must be between 1 and 1000000",
                self.max_connections_per_listener
            ));
            return None;
        }
        Some(Limits {
            http_header_timeout: header?,
            http_body_timeout: body?,
            idle_timeout: idle?,
            max_connections_per_listener: self.max_connections_per_listener,
        })
    }
}

/// `[kubernetes]`: the gateway of a Kubernetes site.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The address imported services are served on: the pod's (or
    /// 0.0.0.0). Each imported service port gets its own port there,
    /// counted from `import_port_base` (see `causeway_api::model::
    /// import_port`); the agent points the derived EndpointSlices at them.
    #[serde(default = "default_import_listen")]
    pub import_listen: String,
    /// The first port of the import listeners.
    #[serde(default = "default_import_port_base")]
    pub import_port_base: u16,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            import_listen: default_import_listen(),
            import_port_base: default_import_port_base(),
        }
    }
}

fn default_import_listen() -> String {
    "0.0.0.0".into()
}

/// Where import listener ports start by default (clear of the NodePort
/// range and of the ephemeral range).
pub const DEFAULT_IMPORT_PORT_BASE: u16 = 20000;

fn default_import_port_base() -> u16 {
    DEFAULT_IMPORT_PORT_BASE
}

/// Where a gateway's outbound listeners for imported services go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenPlan {
    /// One address per service from a range (loopback and VM sites), each
    /// listening on the service's own ports.
    Vips {
        /// First address of the range.
        base: IpAddr,
        /// Its prefix length.
        prefix: u8,
    },
    /// One address (a Kubernetes pod's), one port per service port.
    Ports {
        /// The address.
        ip: IpAddr,
        /// The first port.
        base: u16,
    },
}

/// Which sites may call one local export.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// `<namespace>/<name>` of a local export.
    pub service: String,
    /// Sites whose gateways may call it.
    pub sites: Vec<String>,
}

/// Inbound authorization, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authorization {
    /// Without a rule, refuse (else allow every member site).
    pub deny_by_default: bool,
    /// The sites each service allows.
    pub rules: std::collections::BTreeMap<ServiceKey, Vec<causeway_api::model::SiteName>>,
}

impl Authorization {
    /// Whether `site` may call `service`.
    pub fn allows(&self, site: &causeway_api::model::SiteName, service: &ServiceKey) -> bool {
        match self.rules.get(service) {
            Some(sites) => sites.contains(site),
            None => !self.deny_by_default,
        }
    }
}

/// QUIC tuning for the links between sites. The defaults suit a
/// cross-region link of about 1 Gbit/s and 50 ms round trip; see
/// docs/tuning.md for which knob to turn for which link.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Bottleneck bandwidth of the path, Mbit/s (sizes flow-control windows).
    pub bandwidth_mbps: f64,
    /// Round-trip time of the path, ms (sizes flow-control windows).
    pub rtt_ms: f64,
    /// cubic, bbr or newreno.
    pub congestion: String,
    /// Isolated packet losses per round trip that cubic and newreno do not
    /// take as congestion (random loss on a lossy path; a queue overflowing
    /// drops in bursts, which still count). 0: every loss counts. See
    /// `congestion.rs` and docs/benchmarks.md (`wan-…`) for the measurements
    /// behind the default of 4.
    pub loss_tolerance: u32,
    /// Keepalive PINGs on idle tunnels, ms.
    pub keepalive_ms: u64,
    /// A peer silent this long is dead and its streams fail over, ms.
    pub idle_timeout_ms: u64,
    /// Most concurrent streams one peer gateway may open to this one.
    pub max_streams_per_peer: u32,
    /// UDP socket send and receive buffer sizes, bytes (0: system default).
    pub udp_buffer_bytes: usize,
    /// Largest UDP payload path-MTU discovery may probe up to, bytes.
    /// 1452 fits a 1500-byte Ethernet MTU; raise it on jumbo-frame links
    /// (e.g. 8952 for MTU 9000). Discovery falls back if probes are lost.
    pub max_udp_payload: u16,
    /// Validate a peer's address with a Retry before any handshake work:
    /// an Initial from an address that never answers (a spoofed source)
    /// gets one small Retry back, not a certificate flight, and costs no
    /// connection state. Costs one round trip when a tunnel is made.
    pub retry: bool,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            bandwidth_mbps: 1000.0,
            rtt_ms: 50.0,
            congestion: "cubic".into(),
            loss_tolerance: 4,
            keepalive_ms: 500,
            idle_timeout_ms: 2000,
            max_streams_per_peer: 16384,
            udp_buffer_bytes: 4 * 1024 * 1024,
            max_udp_payload: 1452,
            retry: true,
        }
    }
}

impl QuicConfig {
    /// Bandwidth-delay product in bytes, the window that keeps a path full.
    pub fn bdp_bytes(&self) -> u64 {
        (self.bandwidth_mbps * 1e6 / 8.0 * self.rtt_ms / 1e3) as u64
    }

    fn validate(&self, errs: &mut Vec<String>) {
        if !(self.bandwidth_mbps > 0.0 && self.bandwidth_mbps <= 400_000.0) {
            errs.push("quic.bandwidth_mbps: must be between 0 and 400000".into());
        }
        if !(self.rtt_ms > 0.0 && self.rtt_ms <= 10_000.0) {
            errs.push("quic.rtt_ms: must be between 0 and 10000".into());
        }
        if self.loss_tolerance > 16 {
            errs.push(format!(
                "quic.loss_tolerance: {} is too many; at most 16 isolated losses per round trip may be ignored (1 is the default, 0 counts every loss)",
                self.loss_tolerance
            ));
        }
        if !matches!(self.congestion.as_str(), "cubic" | "bbr" | "newreno") {
            errs.push(format!(
                "quic.congestion: {:?} is not one of cubic, bbr, newreno",
                self.congestion
            ));
        }
        if self.keepalive_ms == 0 || self.idle_timeout_ms <= self.keepalive_ms {
            errs.push("quic: need 0 < keepalive_ms < idle_timeout_ms".into());
        }
        if self.max_streams_per_peer == 0 {
            errs.push("quic.max_streams_per_peer: must be at least 1".into());
        }
        if !(1200..=65000).contains(&self.max_udp_payload) {
            errs.push("quic.max_udp_payload: must be between 1200 and 65000".into());
        }
    }
}

/// One exported service port, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `<namespace>/<name>`.
    pub service: String,
    /// The port callers use.
    pub port: u16,
    /// Optional port name (a DNS label, e.g. "http"): named ports get an
    /// SRV record `_<name>._<protocol>.<svc>.<ns>.svc.clusterset.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    /// "tcp" (default: forwarded per connection), "http" (HTTP/1.1
    /// endpoints) or "http2" (HTTP/2 endpoints without TLS, e.g. gRPC):
    /// both HTTP kinds are routed per request.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Local endpoints (`ip:port`) that serve it.
    pub endpoints: Vec<String>,
    /// A headless export gets no ClusterSetIP: mesh DNS answers with the
    /// addresses of its ready endpoints in every site, which callers reach
    /// directly (this needs a routable network between sites).
    #[serde(default)]
    pub headless: bool,
    /// Optional DNS hostnames of a headless export's endpoints, keyed by
    /// endpoint (`"10.0.0.5:5432" = "pg-0"`): DNS serves
    /// `<hostname>.<site>.<svc>.<ns>.svc.clusterset.local`. Endpoints
    /// without one are named after their address.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hostnames: std::collections::BTreeMap<String, String>,
    /// Health check: with a path (e.g. "/healthz") an endpoint is healthy
    /// when `GET <path>` answers 2xx; without, when it accepts a TCP
    /// connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// Optional zones of the endpoints, keyed by endpoint
    /// (`"10.0.1.5:8080" = "us-east-1a"`): healthy counts are published per
    /// zone. Endpoints without one count in the site's own zone.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub zones: std::collections::BTreeMap<String, String>,
    /// Optional versions of the endpoints, keyed by endpoint
    /// (`"10.0.1.5:8080" = "v2"`): each version is a subset that routes
    /// (HTTPRoute backends) can send traffic to; healthy counts are
    /// published per subset. Endpoints without one are in no subset and
    /// take only traffic that names none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub versions: std::collections::BTreeMap<String, String>,
}

impl ExportConfig {
    /// A TCP export of `service` (`<namespace>/<name>`) on `port`, served by
    /// `endpoints`; every other field at its default.
    pub fn tcp(service: &str, port: u16, endpoints: &[SocketAddr]) -> Self {
        Self {
            service: service.into(),
            port,
            port_name: None,
            protocol: default_protocol(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            headless: false,
            hostnames: Default::default(),
            health_path: None,
            zones: Default::default(),
            versions: Default::default(),
        }
    }
}

/// A per-endpoint table of export `i` (`hostnames`, `zones`): keys must be
/// the export's own endpoints, values pass `check`; problems go to `errs`.
fn per_endpoint(
    i: usize,
    field: &str,
    table: &std::collections::BTreeMap<String, String>,
    endpoints: &[SocketAddr],
    errs: &mut Vec<String>,
    check: impl Fn(&str) -> Result<(), String>,
) -> std::collections::BTreeMap<SocketAddr, String> {
    let mut out = std::collections::BTreeMap::new();
    for (ep, value) in table {
        let Some(addr) = ep
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| endpoints.contains(a))
        else {
            errs.push(format!(
                "exports[{i}].{field}: {ep:?} is not one of this export's endpoints"
            ));
            continue;
        };
        match check(value) {
            Ok(()) => {
                out.insert(addr, value.clone());
            }
            Err(err) => errs.push(format!("exports[{i}].{field}[{ep:?}]: {err}")),
        }
    }
    out
}

/// Endpoints one headless export may list (the controller's bound).
pub const MAX_HEADLESS_ENDPOINTS: usize = 256;

fn default_tunnel_listen() -> String {
    "127.0.0.1:15443".into()
}
fn default_vip_range() -> String {
    "127.10.0.0/16".into()
}
fn default_replica() -> String {
    "gw-0".into()
}
fn default_health_interval() -> f64 {
    1.0
}
fn default_authorization() -> String {
    "allow_members".into()
}
fn default_balancer() -> String {
    "p2c_ewma".into()
}
fn default_retire_grace() -> f64 {
    10.0
}

fn default_drain() -> f64 {
    10.0
}
fn default_cert_ttl() -> f64 {
    86400.0
}
fn default_protocol() -> String {
    "tcp".into()
}

/// One local service port and the endpoints behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalExport {
    /// `<namespace>/<name>`.
    pub service: ServiceKey,
    /// The port callers use.
    pub port: u16,
    /// Empty when unnamed.
    pub port_name: String,
    /// How it is forwarded.
    pub protocol: Protocol,
    /// The endpoints that serve it.
    pub endpoints: Vec<SocketAddr>,
    /// Exported headless (callers reach the endpoints directly).
    pub headless: bool,
    /// Hostnames of (some of) the endpoints of a headless export.
    pub hostnames: std::collections::BTreeMap<SocketAddr, String>,
    /// HTTP health check path, if any.
    pub health_path: Option<String>,
    /// Zones of (some of) the endpoints; the others are in the site's zone.
    pub zones: std::collections::BTreeMap<SocketAddr, String>,
    /// Versions (subsets) of (some of) the endpoints.
    pub versions: std::collections::BTreeMap<SocketAddr, String>,
    /// When the site began exporting it, ms since the epoch; 0 when
    /// unknown (the controller then keeps when it first saw it).
    pub exported_at_ms: u64,
    /// Sessions stick to one endpoint per client address (published so
    /// sites exporting the service differently are told).
    pub client_ip_affinity: bool,
}

/// Validated gateway settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the site's keys and credentials live.
    pub state_dir: PathBuf,
    /// The QUIC endpoint's UDP address.
    pub tunnel_listen: SocketAddr,
    /// The addresses other sites dial, one per replica.
    pub tunnel_advertise: Vec<TunnelAddr>,
    /// First address of the VIP range.
    pub vip_base: IpAddr,
    /// Prefix length of the VIP range.
    pub vip_prefix: u8,
    /// This replica's name (last segment of its SPIFFE ID).
    pub replica: String,
    /// An existing site CA (certificate, key), if configured.
    pub site_ca: Option<(PathBuf, PathBuf)>,
    /// Between local health checks and export publications.
    pub health_interval: Duration,
    /// How long streams in flight may take after SIGTERM.
    pub drain_timeout: Duration,
    /// See [`GatewayConfig::share_listeners`].
    pub share_listeners: bool,
    /// How long a retired tunnel keeps its streams.
    pub retire_grace: Duration,
    /// Lifetime of this replica's tunnel certificate.
    pub cert_ttl: Duration,
    /// How a stream picks a local endpoint.
    pub balancer: causeway_gateway_core::balance::Strategy,
    /// QUIC tuning.
    pub quic: QuicConfig,
    /// Who may call this site's exports.
    pub authorization: Authorization,
    /// The local exports (static; empty on Kubernetes).
    pub exports: Vec<LocalExport>,
    /// Where imported services are served.
    pub listen: ListenPlan,
    /// Timeouts and connection caps.
    pub limits: Limits,
    /// Access logging.
    pub access_log: crate::access::AccessLogConfig,
    /// Distributed tracing.
    pub tracing: crate::trace::TracingConfig,
    /// Exports come from the cluster's ServiceExports.
    pub kubernetes: bool,
    /// The north-south TLS listener, if configured.
    pub ingress: Option<crate::ingress::IngressSettings>,
    /// The file these came from, followed for changes (none: not
    /// reloaded); set by whoever read it.
    pub config_file: Option<PathBuf>,
    /// A replica name given outside the file, kept across reloads.
    pub replica_override: Option<String>,
}

pub use causeway_api::config::ConfigErrors;

impl GatewayConfig {
    /// The defaults every field takes when the TOML leaves it out, for a
    /// site whose state lives in `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            tunnel_listen: default_tunnel_listen(),
            tunnel_advertise: Vec::new(),
            vip_range: default_vip_range(),
            replica: default_replica(),
            site_ca_cert: None,
            site_ca_key: None,
            health_interval_secs: default_health_interval(),
            balancer: default_balancer(),
            drain_secs: default_drain(),
            share_listeners: false,
            retire_grace_secs: default_retire_grace(),
            cert_ttl_secs: default_cert_ttl(),
            authorization: default_authorization(),
            worker_threads: 0,
            allow: Vec::new(),
            quic: QuicConfig::default(),
            limits: LimitsConfig::default(),
            access_log: Default::default(),
            tracing: Default::default(),
            exports: Vec::new(),
            kubernetes: None,
            ingress: None,
        }
    }

    /// Reads a gateway config's TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        toml_parse(text)
    }

    /// The TOML a gateway reads back as this value.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a gateway config is plain TOML data")
    }

    /// Checks every field; all problems at once, each naming its field.
    pub fn validate(&self) -> Result<Settings, ConfigErrors> {
        let mut errs = Vec::new();
        let (tunnel_listen, tunnel_advertise) = self.tunnel(&mut errs);
        let vip = parse_cidr("vip_range", &self.vip_range)
            .map_err(|e| errs.push(format!("vip_range: {e}")))
            .ok();
        self.check_replica(&mut errs);
        let site_ca = self.site_ca(&mut errs);
        self.check_timings(&mut errs);
        let balancer = causeway_gateway_core::balance::Strategy::parse(&self.balancer);
        if balancer.is_none() {
            errs.push(format!(
                "balancer: {:?} is not one of p2c_ewma, round_robin, least_request, weighted",
                self.balancer
            ));
        }
        self.quic.validate(&mut errs);
        let authorization = self.authorization(&mut errs);
        let exports = self.exports(&mut errs);
        let listen = self.listen_plan(vip, &mut errs);
        let limits = self.limits.validate(&mut errs);
        self.access_log.check(&mut errs);
        self.tracing.check(&mut errs);
        let ingress = self.ingress.as_ref().map(|i| i.validate(&mut errs));
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        let (vip_base, vip_prefix) = vip.expect("checked above");
        Ok(Settings {
            state_dir: self.state_dir.clone(),
            tunnel_listen: tunnel_listen.expect("checked above"),
            tunnel_advertise,
            vip_base,
            vip_prefix,
            replica: self.replica.clone(),
            site_ca,
            health_interval: Duration::from_secs_f64(self.health_interval_secs),
            drain_timeout: Duration::from_secs_f64(self.drain_secs),
            share_listeners: self.share_listeners,
            retire_grace: Duration::from_secs_f64(self.retire_grace_secs),
            cert_ttl: Duration::from_secs_f64(self.cert_ttl_secs),
            balancer: balancer.expect("checked above"),
            quic: self.quic.clone(),
            authorization,
            exports,
            listen: listen.expect("checked above"),
            limits: limits.expect("checked above"),
            access_log: self.access_log.clone(),
            tracing: self.tracing.clone(),
            kubernetes: self.kubernetes.is_some(),
            ingress: ingress.map(|i| i.expect("checked above")),
            config_file: None,
            replica_override: None,
        })
    }

    /// Where imported services are served: the VIP range, or on
    /// Kubernetes one port per service port on the pod's address.
    fn listen_plan(&self, vip: Option<(IpAddr, u8)>, errs: &mut Vec<String>) -> Option<ListenPlan> {
        let Some(k) = &self.kubernetes else {
            let (base, prefix) = vip?;
            return Some(ListenPlan::Vips { base, prefix });
        };
        if !self.exports.is_empty() {
            errs.push("exports: must be empty with [kubernetes]: the cluster's ServiceExports say what this site exports".into());
        }
        if k.import_port_base < 1024 {
            errs.push(format!(
                "kubernetes.import_port_base: {} is a privileged port; use 1024 or above (default {DEFAULT_IMPORT_PORT_BASE})",
                k.import_port_base
            ));
        }
        match k.import_listen.parse::<IpAddr>() {
            Ok(ip) => Some(ListenPlan::Ports {
                ip,
                base: k.import_port_base,
            }),
            Err(_) => {
                errs.push(format!(
                    "kubernetes.import_listen: {:?} is not an IP address (the pod's, or 0.0.0.0)",
                    k.import_listen
                ));
                None
            }
        }
    }

    /// The tunnel's listen address and the addresses other sites dial.
    fn tunnel(&self, errs: &mut Vec<String>) -> (Option<SocketAddr>, Vec<TunnelAddr>) {
        let tunnel_listen = self
            .tunnel_listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                errs.push(format!(
                    "tunnel_listen: {:?} is not an ip:port address",
                    self.tunnel_listen
                ))
            })
            .ok();
        let mut tunnel_advertise = Vec::new();
        for (i, a) in self.tunnel_advertise.iter().enumerate() {
            match a.parse::<TunnelAddr>() {
                Ok(t) if t.addr.ip().is_unspecified() => errs.push(format!(
                    "tunnel_advertise[{i}]: {} is unspecified; advertise an address other sites can reach",
                    t.addr
                )),
                Ok(t) => tunnel_advertise.push(t),
                Err(e) => errs.push(format!("tunnel_advertise[{i}]: {e}")),
            }
        }
        if tunnel_advertise.is_empty() {
            if let Some(l) = tunnel_listen {
                if l.ip().is_unspecified() {
                    errs.push(
                        "tunnel_advertise: required when tunnel_listen is an unspecified address"
                            .into(),
                    );
                } else {
                    tunnel_advertise.push(TunnelAddr { addr: l, weight: 1 });
                }
            }
        }
        (tunnel_listen, tunnel_advertise)
    }

    fn check_replica(&self, errs: &mut Vec<String>) {
        if self.replica.is_empty()
            || self.replica.len() > 63
            || !self
                .replica
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            errs.push(format!(
                "replica: {:?} must be 1-63 letters, digits, '-', '_' or '.'",
                self.replica
            ));
        }
    }

    fn site_ca(&self, errs: &mut Vec<String>) -> Option<(PathBuf, PathBuf)> {
        match (&self.site_ca_cert, &self.site_ca_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                errs.push("site_ca_cert and site_ca_key: give both or neither".into());
                None
            }
        }
    }

    fn check_timings(&self, errs: &mut Vec<String>) {
        if !(self.health_interval_secs >= 0.1 && self.health_interval_secs <= 300.0) {
            errs.push("health_interval_secs: must be between 0.1 and 300".into());
        }
        if !(self.cert_ttl_secs >= 3.0 && self.cert_ttl_secs <= 90.0 * 86400.0) {
            errs.push("cert_ttl_secs: must be between 3 and 7776000 (90 days)".into());
        }
        if !(self.drain_secs >= 0.0 && self.drain_secs <= 3600.0) {
            errs.push("drain_secs: must be between 0 and 3600".into());
        }
        if !(self.retire_grace_secs >= 0.0 && self.retire_grace_secs <= 86400.0) {
            errs.push("retire_grace_secs: must be between 0 and 86400 (a day)".into());
        }
        if self.worker_threads > 1024 {
            errs.push("worker_threads: must be between 0 (one per CPU) and 1024".into());
        }
    }

    /// Who may call this site's exports.
    fn authorization(&self, errs: &mut Vec<String>) -> Authorization {
        let mut authorization = Authorization {
            deny_by_default: match self.authorization.as_str() {
                "allow_members" => false,
                "deny" => true,
                other => {
                    errs.push(format!(
                        "authorization: {other:?} is not allow_members or deny"
                    ));
                    false
                }
            },
            rules: Default::default(),
        };
        for (i, a) in self.allow.iter().enumerate() {
            let key = a
                .service
                .parse::<ServiceKey>()
                .map_err(|e| errs.push(format!("allow[{i}].service: {e}")))
                .ok();
            let mut sites = Vec::new();
            for (j, s) in a.sites.iter().enumerate() {
                match s.parse() {
                    Ok(s) => sites.push(s),
                    Err(e) => errs.push(format!("allow[{i}].sites[{j}]: {e}")),
                }
            }
            if let Some(k) = key {
                authorization.rules.entry(k).or_default().extend(sites);
            }
        }
        authorization
    }

    /// The exports, each checked alone, then against the ones before it.
    fn exports(&self, errs: &mut Vec<String>) -> Vec<LocalExport> {
        let mut exports: Vec<LocalExport> = Vec::new();
        for (i, e) in self.exports.iter().enumerate() {
            let Some(export) = e.validate(i, errs) else {
                continue;
            };
            if let Some(other) = exports
                .iter()
                .find(|x| x.service == export.service && x.headless != export.headless)
            {
                errs.push(format!(
                    "exports[{i}].headless: {} port {} says {}, port {} says {}; \
                     every entry of one service must agree",
                    export.service, e.port, e.headless, other.port, other.headless
                ));
            }
            if exports
                .iter()
                .any(|x| x.service == export.service && x.port == e.port)
            {
                errs.push(format!(
                    "exports[{i}]: {} port {} is listed twice",
                    export.service, e.port
                ));
            }
            exports.push(export);
        }
        exports
    }
}

impl ExportConfig {
    /// Export `i` checked on its own; `None` when its service or protocol
    /// is unusable (the problems are in `errs`).
    fn validate(&self, i: usize, errs: &mut Vec<String>) -> Option<LocalExport> {
        let e = self;
        let service = e
            .service
            .parse::<ServiceKey>()
            .map_err(|err| errs.push(format!("exports[{i}].service: {err}")))
            .ok();
        let protocol = e
            .protocol
            .parse::<Protocol>()
            .map_err(|err| errs.push(format!("exports[{i}].protocol: {err}")))
            .ok();
        if e.port == 0 {
            errs.push(format!("exports[{i}].port: must be 1-65535"));
        }
        if e.endpoints.is_empty() {
            errs.push(format!("exports[{i}].endpoints: list at least one ip:port"));
        }
        let port_name = match &e.port_name {
            None => String::new(),
            Some(n) => match causeway_api::model::check_dns_label("port name", n) {
                Ok(()) => n.clone(),
                Err(err) => {
                    errs.push(format!("exports[{i}].port_name: {err}"));
                    String::new()
                }
            },
        };
        let mut endpoints = Vec::new();
        for (j, ep) in e.endpoints.iter().enumerate() {
            match ep.parse::<SocketAddr>() {
                Ok(a) if e.headless && a.port() != e.port => errs.push(format!(
                    "exports[{i}].endpoints[{j}]: {ep:?}: callers reach the endpoints of a \
                     headless export directly, so they must listen on its port {}",
                    e.port
                )),
                Ok(a) => endpoints.push(a),
                Err(_) => errs.push(format!(
                    "exports[{i}].endpoints[{j}]: {ep:?} is not an ip:port address"
                )),
            }
        }
        if e.headless && e.endpoints.len() > MAX_HEADLESS_ENDPOINTS {
            errs.push(format!(
                "exports[{i}].endpoints: a headless export may list at most \
                 {MAX_HEADLESS_ENDPOINTS} endpoints"
            ));
        }
        if !e.headless && !e.hostnames.is_empty() {
            errs.push(format!(
                "exports[{i}].hostnames: only headless exports name their endpoints; \
                 set headless = true or remove hostnames"
            ));
        }
        if let Some(p) = &e.health_path {
            let ok =
                p.starts_with('/') && p.len() <= 1024 && p.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                errs.push(format!(
                    "exports[{i}].health_path: {p:?} must start with / and hold no spaces (e.g. \"/healthz\")"
                ));
            }
        }
        let hostnames = per_endpoint(i, "hostnames", &e.hostnames, &endpoints, errs, |h| {
            causeway_api::model::check_dns_label("hostname", h).map_err(|e| e.to_string())
        });
        let zones = per_endpoint(i, "zones", &e.zones, &endpoints, errs, |z| {
            if z.is_empty() {
                return Err("empty; leave the endpoint out to mean the site's own zone".into());
            }
            causeway_api::model::check_label_value("zone", z).map_err(|e| e.to_string())
        });
        let versions = per_endpoint(i, "versions", &e.versions, &endpoints, errs, |v| {
            if v.is_empty() {
                return Err("empty; leave the endpoint out to put it in no subset".into());
            }
            causeway_api::model::check_label_value("version", v).map_err(|e| e.to_string())
        });
        Some(LocalExport {
            service: service?,
            port: e.port,
            port_name,
            protocol: protocol?,
            endpoints,
            headless: e.headless,
            hostnames,
            health_path: e.health_path.clone(),
            zones,
            versions,
            exported_at_ms: 0,
            client_ip_affinity: false,
        })
    }
}

fn toml_parse(text: &str) -> Result<GatewayConfig, ConfigErrors> {
    toml::from_str(text).map_err(|e| ConfigErrors::toml("", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_config_reads_back_as_the_same_settings() {
        let mut cfg = GatewayConfig::new("/var/lib/causeway/east".into());
        cfg.exports.push(ExportConfig::tcp(
            "shop/echo",
            7000,
            &["127.0.0.1:9001".parse().unwrap()],
        ));
        cfg.exports[0].port_name = Some("echo".into());
        cfg.retire_grace_secs = 3.0;
        let text = cfg.to_toml();
        let back = GatewayConfig::from_toml(&text).unwrap();
        assert_eq!(
            format!("{:?}", back.validate().unwrap()),
            format!("{:?}", cfg.validate().unwrap())
        );
        assert!(text.contains("port = 7000\n"), "{text}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_all_reported() {
        let err =
            GatewayConfig::from_toml("state_dir = \"/x\"\ntunel_listen = \"1\"\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `tunel_listen`"),
            "{err}"
        );

        let cfg = GatewayConfig::from_toml(
            r#"
            state_dir = "/x"
            tunnel_listen = "nope"
            vip_range = "10.0.0.0"
            [[exports]]
            service = "payments"
            port = 0
            endpoints = ["127.0.0.1"]
            "#,
        )
        .unwrap();
        let err = cfg.validate().unwrap_err();
        let text = err.to_string();
        for needle in [
            "tunnel_listen",
            "vip_range",
            "exports[0].service",
            "exports[0].port",
            "exports[0].endpoints[0]",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
    }

    #[test]
    fn quic_windows_follow_the_bandwidth_delay_product() {
        let q = QuicConfig::default();
        assert_eq!(q.bdp_bytes(), 6_250_000);
        let cfg = GatewayConfig::from_toml(
            "state_dir = \"/x\"\n[quic]\ncongestion = \"vegas\"\nrtt_ms = 0\nloss_tolerance = 99\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("quic.congestion")
                && err.contains("quic.rtt_ms")
                && err.contains("quic.loss_tolerance: 99 is too many"),
            "{err}"
        );
    }

    #[test]
    fn retire_grace_is_bounded_and_defaults_to_ten_seconds() {
        let cfg = GatewayConfig::from_toml("state_dir = \"/x\"\n").unwrap();
        assert_eq!(
            cfg.validate().unwrap().retire_grace,
            Duration::from_secs(10)
        );
        for (v, ok) in [
            ("0", true),
            ("2.5", true),
            ("86400", true),
            ("-1", false),
            ("86401", false),
        ] {
            let cfg =
                GatewayConfig::from_toml(&format!("state_dir = \"/x\"\nretire_grace_secs = {v}\n"))
                    .unwrap();
            match cfg.validate() {
                Ok(s) => {
                    assert!(ok, "{v} accepted");
                    assert_eq!(s.retire_grace.as_secs_f64(), v.parse::<f64>().unwrap());
                }
                Err(e) => {
                    assert!(!ok, "{v} refused: {e}");
                    assert!(e.to_string().contains("retire_grace_secs"), "{e}");
                }
            }
        }
    }

    #[test]
    fn worker_threads_are_bounded() {
        for (n, ok) in [(0, true), (1, true), (64, true), (1025, false)] {
            let cfg =
                GatewayConfig::from_toml(&format!("state_dir = \"/x\"\nworker_threads = {n}\n"))
                    .unwrap();
            match cfg.validate() {
                Ok(_) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e}");
                    assert!(e.to_string().contains("worker_threads"), "{e}");
                }
            }
        }
    }

    #[test]
    fn defaults_are_sane() {
        let s = GatewayConfig::from_toml("state_dir = \"/x\"")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            s.tunnel_advertise,
            vec![TunnelAddr {
                addr: s.tunnel_listen,
                weight: 1
            }]
        );
        assert_eq!(s.vip_prefix, 16);
    }
}

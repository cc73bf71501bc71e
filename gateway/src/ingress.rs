//! North-south ingress: a TLS listener for clients outside the mesh. It
//! terminates TLS with a certificate chosen by SNI (PEM files, reloaded
//! when they change; a bad new file keeps the old certificate), optionally
//! verifies client certificates, speaks HTTP/1.1 and HTTP/2 (ALPN), and
//! hands each request to the HTTP path as if a workload of this site had
//! called the service its host maps to — so HTTPRoute, retries, timeouts,
//! failover and the exporters' checks all apply, to services in any site.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use causeway_api::model::ServiceKey;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::http::HttpForward;

/// `[ingress]` in the gateway config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Where clients connect (`ip:port`).
    pub listen: String,
    /// Certificates, each for the host names it serves.
    pub certificates: Vec<CertConfig>,
    /// A PEM bundle of CAs client certificates must chain to; without it no
    /// client certificate is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (default) or `optional`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<String>,
    /// Which federated service each host reaches.
    pub routes: Vec<IngressRoute>,
}

/// One certificate.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// Host names (`shop.example.com`, or `*.example.com` for one label).
    pub hosts: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// One host's service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IngressRoute {
    /// The Host (or `:authority`) asked for; `*` for any other.
    pub host: String,
    /// `<namespace>/<name>`.
    pub service: String,
    /// The service port (an `http` or `http2` port).
    pub port: u16,
}

/// Validated ingress settings.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressSettings {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The certificates.
    pub certificates: Vec<CertConfig>,
    /// Client CAs, and whether a client certificate is required.
    pub client_ca: Option<(PathBuf, bool)>,
    /// Host (lower case) → service and port.
    pub routes: BTreeMap<String, (ServiceKey, u16)>,
}

fn host_ok(h: &str) -> bool {
    let body = h.strip_prefix("*.").unwrap_or(h);
    !body.is_empty()
        && h.len() <= 253
        && body.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl IngressConfig {
    /// Checks every field; problems go to `errs`, each naming its field.
    pub fn validate(&self, errs: &mut Vec<String>) -> Option<IngressSettings> {
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| {
                errs.push(format!(
                    "ingress.listen: {:?} is not an ip:port address (e.g. \"0.0.0.0:8443\")",
                    self.listen
                ))
            })
            .ok();
        if self.certificates.is_empty() {
            errs.push("ingress.certificates: list at least one certificate".into());
        }
        for (i, c) in self.certificates.iter().enumerate() {
            if c.hosts.is_empty() {
                errs.push(format!(
                    "ingress.certificates[{i}].hosts: list the host names it serves"
                ));
            }
            for h in &c.hosts {
                if !host_ok(h) {
                    errs.push(format!(
                        "ingress.certificates[{i}].hosts: {h:?} is not a host name (shop.example.com or *.example.com)"
                    ));
                }
            }
            if let Err(e) = load_certified(c) {
                errs.push(format!("ingress.certificates[{i}]: {e}"));
            }
        }
        let client_ca = match (&self.client_ca, self.client_auth.as_deref()) {
            (None, None) => None,
            (None, Some(_)) => {
                errs.push(
                    "ingress.client_auth: needs client_ca (the CAs client certificates chain to)"
                        .into(),
                );
                None
            }
            (Some(ca), mode) => {
                let required = match mode {
                    None | Some("required") => true,
                    Some("optional") => false,
                    Some(other) => {
                        errs.push(format!(
                            "ingress.client_auth: {other:?}: use required or optional"
                        ));
                        true
                    }
                };
                if let Err(e) = client_roots(ca) {
                    errs.push(format!("ingress.client_ca: {e}"));
                }
                Some((ca.clone(), required))
            }
        };
        let mut routes = BTreeMap::new();
        if self.routes.is_empty() {
            errs.push("ingress.routes: list at least one host and the service it reaches".into());
        }
        for (i, r) in self.routes.iter().enumerate() {
            let host = r.host.to_ascii_lowercase();
            if host != "*" && !host_ok(&host) {
                errs.push(format!(
                    "ingress.routes[{i}].host: {:?} is not a host name (or *)",
                    r.host
                ));
            }
            let service = r
                .service
                .parse::<ServiceKey>()
                .map_err(|e| errs.push(format!("ingress.routes[{i}].service: {e}")))
                .ok();
            if r.port == 0 {
                errs.push(format!("ingress.routes[{i}].port: must be 1-65535"));
            }
            if let Some(s) = service {
                if routes.insert(host.clone(), (s, r.port)).is_some() {
                    errs.push(format!(
                        "ingress.routes[{i}].host: {host:?} is listed twice"
                    ));
                }
            }
        }
        Some(IngressSettings {
            listen: listen?,
            certificates: self.certificates.clone(),
            client_ca,
            routes,
        })
    }
}

/// A certificate and key from PEM files.
fn load_certified(c: &CertConfig) -> Result<CertifiedKey, String> {
    let chain = std::fs::read(&c.cert).map_err(|e| format!("cert {}: {e}", c.cert.display()))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut chain.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert {}: {e}", c.cert.display()))?;
    if chain.is_empty() {
        return Err(format!("cert {}: no certificate in it", c.cert.display()));
    }
    let key = std::fs::read(&c.key).map_err(|e| format!("key {}: {e}", c.key.display()))?;
    let key = rustls_pemfile::private_key(&mut key.as_slice())
        .map_err(|e| format!("key {}: {e}", c.key.display()))?
        .ok_or_else(|| format!("key {}: no private key in it", c.key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("key {}: {e}", c.key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        format!(
            "cert {} and key {} do not match: {e}",
            c.cert.display(),
            c.key.display()
        )
    })?;
    Ok(ck)
}

fn client_roots(path: &PathBuf) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}

/// The certificates by host, swapped in place when their files change.
#[derive(Debug)]
struct SniCerts {
    entries: RwLock<Vec<Entry>>,
}

#[derive(Debug)]
struct Entry {
    config: CertConfig,
    key: Arc<CertifiedKey>,
    stamp: Option<(SystemTime, SystemTime)>,
}

fn stamp(c: &CertConfig) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&c.cert)?, m(&c.key)?))
}

fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let chosen = match hello.server_name() {
            Some(name) => entries
                .iter()
                .find(|e| e.config.hosts.iter().any(|h| host_matches(h, name)))
                .or(entries.first()),
            None => entries.first(),
        };
        chosen.map(|e| e.key.clone())
    }
}

impl SniCerts {
    /// Reloads the certificates whose files changed; a file that no longer
    /// loads keeps the certificate it replaced.
    fn reload(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for e in entries.iter_mut() {
            let now = stamp(&e.config);
            if now.is_none() || now == e.stamp {
                continue;
            }
            match load_certified(&e.config) {
                Ok(k) => {
                    tracing::info!(hosts = ?e.config.hosts, "ingress certificate reloaded");
                    metrics::counter!("causeway_ingress_cert_reloads_total", "result" => "ok")
                        .increment(1);
                    e.key = Arc::new(k);
                    e.stamp = now;
                }
                Err(why) => {
                    metrics::counter!("causeway_ingress_cert_reloads_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(hosts = ?e.config.hosts, error = %why, "ingress certificate files changed but do not load; keeping the previous certificate");
                    e.stamp = now;
                }
            }
        }
    }
}

/// How often certificate files are looked at.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Serves the ingress until `stop` turns true.
pub async fn run(
    settings: IngressSettings,
    http: Arc<HttpForward>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    for c in &settings.certificates {
        let key = load_certified(c).map_err(|e| anyhow::anyhow!("ingress certificate: {e}"))?;
        entries.push(Entry {
            stamp: stamp(c),
            config: c.clone(),
            key: Arc::new(key),
        });
    }
    let certs = Arc::new(SniCerts {
        entries: RwLock::new(entries),
    });
    let builder = rustls::ServerConfig::builder();
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some((ca, required)) => {
            let roots = client_roots(ca).map_err(|e| anyhow::anyhow!("ingress client_ca: {e}"))?;
            let v = WebPkiClientVerifier::builder(Arc::new(roots));
            let v = if *required {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(v.build()?)
        }
    };
    let mut tls = builder.with_cert_resolver(certs.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tracing::info!(addr = %settings.listen, hosts = settings.routes.len(), "ingress listening");
    let routes = Arc::new(settings.routes);
    let reload = {
        let certs = certs.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                certs.reload();
            }
        })
    };
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "ingress accept failed");
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let (acceptor, http, routes) = (acceptor.clone(), http.clone(), routes.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics::counter!("causeway_ingress_handshakes_total", "result" => "failed")
                        .increment(1);
                    tracing::debug!(%peer, error = %e, "ingress TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics::counter!("causeway_ingress_handshakes_total", "result" => "timeout")
                        .increment(1);
                    return;
                }
            };
            metrics::counter!("causeway_ingress_handshakes_total", "result" => "ok").increment(1);
            serve(tls, peer, http, routes).await;
        });
    }
    reload.abort();
    Ok(())
}

async fn serve(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    http: Arc<HttpForward>,
    routes: Arc<BTreeMap<String, (ServiceKey, u16)>>,
) {
    let client: Arc<str> = peer.to_string().into();
    let limits = http.fwd.limits;
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (http, routes, client) = (http.clone(), routes.clone(), client.clone());
        async move {
            Ok::<_, std::convert::Infallible>(route_request(&http, &routes, req, &client).await)
        }
    });
    let builder = crate::http::server_builder(&limits);
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
        tracing::debug!(error = %e, "ingress connection ended with an error");
    }
}

async fn route_request(
    http: &Arc<HttpForward>,
    routes: &BTreeMap<String, (ServiceKey, u16)>,
    req: Request<Incoming>,
    client: &str,
) -> Response<crate::http::Body> {
    let host = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string())
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    let Some((service, port)) = routes.get(&host).or_else(|| routes.get("*")).cloned() else {
        metrics::counter!("causeway_ingress_requests_total", "result" => "no_route").increment(1);
        return crate::http::full(
            StatusCode::NOT_FOUND,
            &format!("no ingress route for host {host:?}"),
            "no-route",
        );
    };
    let table = http.fwd.routes.borrow().clone();
    let protocol = table
        .services
        .get(&service)
        .and_then(|s| s.http_ports.get(&port).copied());
    let Some(protocol) = protocol else {
        metrics::counter!("causeway_ingress_requests_total", "result" => "no_service").increment(1);
        return crate::http::full(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{service} port {port} is not an available http or http2 service"),
            "no-upstream",
        );
    };
    metrics::counter!("causeway_ingress_requests_total", "result" => "routed").increment(1);
    crate::http::proxy(http, req, &service, port, protocol, client).await
}

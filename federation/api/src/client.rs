//! Talking to the controllers: an mTLS channel that fails over between
//! endpoints, and the `Watch` loop that keeps a [`CatalogView`] current.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::catalog::CatalogView;
use crate::identity::{Credential, CONTROLLER_SERVER_NAME};
use crate::pb::federation_client::FederationClient;
use crate::pb::{self, WatchRequest};
use crate::sync::LockExt;

/// Why no controller could be called.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Every endpoint failed.
    #[error("no controller endpoint is reachable (tried {tried}): {last}")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        tried: String,
        /// What the last one said.
        last: String,
    },
    /// An endpoint is not `host:port`.
    #[error("bad controller endpoint {0:?}: expected host:port")]
    BadEndpoint(String),
}

/// Connects to whichever controller answers; rotates on failure.
pub struct ControllerClient {
    endpoints: Vec<String>,
    local: Option<std::net::IpAddr>,
    /// Replaced when the credential is renewed.
    tls: std::sync::Mutex<ClientTlsConfig>,
    next: AtomicUsize,
    /// The channel in use; dropped by `rotate` after a failure.
    cached: std::sync::Mutex<Option<Channel>>,
}

impl ControllerClient {
    /// `credential` is `None` only for the join call, which the token authorizes.
    pub fn new(endpoints: Vec<String>, ca_pem: &str, credential: Option<&Credential>) -> Self {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(CONTROLLER_SERVER_NAME);
        if let Some(c) = credential {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        Self {
            endpoints,
            local: None,
            tls: std::sync::Mutex::new(tls),
            next: AtomicUsize::new(0),
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The same credential and trust for other endpoints.
    pub fn with_endpoints(&self, endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            local: self.local,
            tls: std::sync::Mutex::new(self.tls.locked().clone()),
            next: AtomicUsize::new(0),
            cached: std::sync::Mutex::new(None),
        }
    }

    /// Connects from this local address (a multi-homed host's chosen
    /// interface).
    pub fn bind_local(mut self, ip: std::net::IpAddr) -> Self {
        self.local = Some(ip);
        self
    }

    /// The controller endpoints, in the order they are tried.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A channel to one reachable controller, trying each endpoint once.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        if let Some(ch) = self.cached.locked().clone() {
            return Ok(ch);
        }
        let n = self.endpoints.len().max(1);
        let start = self.next.load(Ordering::Relaxed);
        let mut last = String::from("no endpoints configured");
        for i in 0..n {
            let Some(addr) = self.endpoints.get((start + i) % n) else {
                break;
            };
            let ep = Channel::from_shared(format!("https://{addr}"))
                .map_err(|_| ClientError::BadEndpoint(addr.clone()))?
                .tls_config(self.tls.locked().clone())
                .map_err(|e| ClientError::BadEndpoint(format!("{addr}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .user_agent(crate::version::user_agent())
                .map_err(|e| ClientError::BadEndpoint(format!("{addr}: {e}")))?
                .local_address(self.local)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            match ep.connect().await {
                Ok(ch) => {
                    self.next.store((start + i) % n, Ordering::Relaxed);
                    *self.cached.locked() = Some(ch.clone());
                    return Ok(ch);
                }
                Err(e) => {
                    last = format!("{addr}: {}", error_chain(&e));
                }
            }
        }
        self.rotate();
        Err(ClientError::Unreachable {
            tried: self.endpoints.join(", "),
            last,
        })
    }

    /// A `Federation` client on the first endpoint that answers.
    pub async fn federation(&self) -> Result<FederationClient<Channel>, ClientError> {
        Ok(FederationClient::new(self.channel().await?))
    }

    /// Runs `op` against a controller: an endpoint that cannot be reached
    /// (or, with `leader_only`, one that refuses because it is not the
    /// leader) passes the call to the next, each endpoint once.
    pub async fn call<T, F, Fut>(&self, leader_only: bool, op: F) -> Result<T, tonic::Status>
    where
        F: Fn(FederationClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = tonic::Status::unavailable("no controller endpoints configured");
        for _ in 0..self.endpoints.len().max(1) {
            let fed = match self.federation().await {
                Ok(f) => f,
                // `channel` has tried every endpoint already.
                Err(e) => return Err(tonic::Status::unavailable(e.to_string())),
            };
            match op(fed).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        || (leader_only && s.code() == tonic::Code::FailedPrecondition) =>
                {
                    self.rotate();
                    last = s;
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    /// The catalog, from whichever endpoint can serve it: with
    /// `linearizable`, nodes that are not the leader refuse and the next
    /// endpoint is tried.
    pub async fn catalog(&self, linearizable: bool) -> Result<pb::CatalogSnapshot, tonic::Status> {
        self.call(linearizable, |mut f| async move {
            f.catalog(pb::CatalogRequest { linearizable }).await
        })
        .await
    }

    /// Uses `credential` for every connection from now on (after a
    /// renewal): the cached channel is dropped, so the next call connects
    /// with it; streams open on the old channel run on until they end.
    pub fn set_credential(&self, credential: &Credential) {
        let tls = self.tls.locked().clone().identity(Identity::from_pem(
            &credential.cert_pem,
            &credential.key_pem,
        ));
        *self.tls.locked() = tls;
        self.cached.locked().take();
    }

    /// Moves on to the next endpoint (after an RPC failure).
    pub fn rotate(&self) {
        self.cached.locked().take();
        self.next.fetch_add(1, Ordering::Relaxed);
    }
}

/// The full source chain of an error, for messages a person reads.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Keeps `tx` updated with the catalog. Resumes from the last applied
/// revision after a disconnect; while disconnected the last view stays in
/// place (static stability) and `causeway_watch_connected` reads 0.
pub async fn run_watch(client: Arc<ControllerClient>, tx: watch::Sender<Arc<CatalogView>>) {
    // How stale the served view may be: seconds since the stream was last
    // healthy (0 while connected). Exported by a ticker so it keeps rising
    // while the watch loop is blocked reconnecting.
    let since = Arc::new(std::sync::Mutex::new(Some(std::time::Instant::now())));
    let ticker = {
        let since = since.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                t.tick().await;
                let stale = since
                    .locked()
                    .map(|s| s.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
                metrics::gauge!("causeway_catalog_stale_seconds").set(stale);
            }
        })
    };
    let _stop_ticker = AbortOnDrop(ticker);
    let mut view = CatalogView::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = async {
            let mut c = client.federation().await?;
            let from = if view.synced { view.revision.0 } else { 0 };
            let mut stream = c
                .watch(WatchRequest {
                    from_revision: from,
                    epoch: view.epoch,
                })
                .await
                .map_err(|s| anyhow_status("watch", s))?
                .into_inner();
            metrics::gauge!("causeway_watch_connected").set(1.0);
            *since.locked() = None;
            tracing::debug!(from, "watch stream open");
            loop {
                match stream.message().await {
                    Ok(Some(event)) => match view.apply(event) {
                        Ok(true) => {
                            metrics::gauge!("causeway_catalog_revision")
                                .set(view.revision.0 as f64);
                            tx.send_replace(Arc::new(view.clone()));
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "watch gap, resyncing");
                            view.synced = false;
                            return Ok::<(), ClientError>(());
                        }
                    },
                    Ok(None) => return Ok(()),
                    Err(s) => return Err(anyhow_status("watch stream", s)),
                }
            }
        }
        .await;
        metrics::gauge!("causeway_watch_connected").set(0.0);
        since.locked().get_or_insert_with(std::time::Instant::now);
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, "controller watch interrupted; serving the last view");
                client.rotate();
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn anyhow_status(what: &str, s: tonic::Status) -> ClientError {
    ClientError::Unreachable {
        tried: what.to_string(),
        last: format!("{}: {}", s.code(), s.message()),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

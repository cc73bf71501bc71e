//! Pooled QUIC connections to remote sites: one per gateway replica of each
//! site in use, shared by every stream to that replica. New streams are
//! spread across a site's live replicas by weight (smooth weighted round
//! robin from the sans-IO core). A replica whose connection closes — the
//! peer went away, or keepalives stopped and the idle timeout fired (see
//! `[quic]`) — is redialed in the background with exponential backoff and
//! jitter; until it is back, its share goes to the others. A stream that
//! needs a site whose every replica waits out a backoff (nothing else could
//! serve it) dials early, at most once per replica per 250 ms, so a peer
//! that restarted is back at once rather than after the backoff.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use causeway_api::identity::Credential;
use causeway_api::model::{SiteName, TunnelAddr};
use causeway_api::trust::TrustStore;
use causeway_gateway_core::balance::{Balancer, EndpointStats, Strategy};

use crate::routes::SiteRoute;
use crate::tunnel;
use causeway_api::sync::LockExt;

const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// First redial delay after a failure; doubles up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// While a replica waits out its backoff, a stream that needs it may dial
/// it early, at most this often.
const EARLY_DIAL_EVERY: Duration = Duration::from_millis(250);

/// Pooled, authenticated tunnels to other sites: one QUIC connection per
/// peer replica, redialed with backoff, streams spread by weight.
pub struct Pool {
    /// QUIC tuning for new dials; replaced by a config reload.
    quic: Mutex<crate::config::QuicConfig>,
    /// How long a retired connection keeps its streams before it closes.
    retire_grace: Duration,
    endpoint: quinn::Endpoint,
    /// This replica's certificate for new dials; replaced on renewal.
    cred: Mutex<Credential>,
    store: Arc<TrustStore>,
    sites: Mutex<HashMap<SiteName, SitePool>>,
    /// Connections retired but not closed yet (their `stable_id`): they
    /// carry the streams they have, and nothing new — not even a pooled
    /// HTTP connection's next request.
    retired: Mutex<HashSet<usize>>,
    me: Weak<Pool>,
}

struct SitePool {
    route: SiteRoute,
    replicas: Vec<Replica>,
    balancer: Balancer,
}

struct Replica {
    at: TunnelAddr,
    conn: Option<quinn::Connection>,
    /// A background dial is under way.
    dialing: bool,
    failures: u32,
    /// When a stream last dialed this replica ahead of its backoff.
    early_at: Option<std::time::Instant>,
    /// That early dial is under way: other streams wait for it.
    early_dialing: bool,
}

impl Replica {
    fn live(&self) -> Option<&quinn::Connection> {
        self.conn.as_ref().filter(|c| c.close_reason().is_none())
    }
}

/// Why no connection to a site could be had.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The site lists no gateway to dial.
    #[error("site {0} advertises no tunnel address")]
    NoAddress(SiteName),
    /// Every replica was tried (or is waiting out a backoff).
    #[error("could not reach site {site} at any of its tunnel addresses: {last}")]
    Unreachable {
        /// The site.
        site: SiteName,
        /// What the last attempt said.
        last: String,
    },
}

/// Why one dial of one replica failed.
#[derive(Debug, thiserror::Error)]
enum ReplicaDialError {
    #[error("site left the pool")]
    SiteLeft,
    #[error("{0}")]
    Tls(String),
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Handshake(#[from] quinn::ConnectionError),
    #[error("handshake timed out")]
    TimedOut,
}

/// What to do for a stream that needs a connection to a site, decided
/// under the pool's lock.
enum Plan {
    /// A live replica, picked by weight.
    Use(quinn::Connection),
    /// A first dial is under way: wait for it.
    Wait,
    /// Dial these now (`early`: ahead of their backoff).
    Dial {
        candidates: Vec<TunnelAddr>,
        early: bool,
    },
}

/// The delay before redial number `failures` (1-based): exponential from
/// `BACKOFF_MIN`, capped at `BACKOFF_MAX`, then scaled by `jitter` in
/// [0.5, 1.0) so that gateways that lost the same peer do not redial in step.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(BACKOFF_MAX)
        .mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

fn count(result: &'static str) {
    metrics::counter!("causeway_tunnel_connections_total", "direction" => "out", "result" => result)
        .increment(1);
}

impl Pool {
    /// A pool dialing from `endpoint` with `cred`, verifying peers against
    /// `store`.
    pub fn new(
        endpoint: quinn::Endpoint,
        cred: Credential,
        store: Arc<TrustStore>,
        quic: crate::config::QuicConfig,
        retire_grace: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            quic: Mutex::new(quic),
            retire_grace,
            endpoint,
            cred: Mutex::new(cred),
            store,
            sites: Mutex::new(HashMap::new()),
            retired: Mutex::new(HashSet::new()),
            me: me.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SiteName, SitePool>> {
        self.sites.locked()
    }

    fn publish_gauge(sites: &HashMap<SiteName, SitePool>) {
        let n = sites
            .values()
            .flat_map(|s| &s.replicas)
            .filter(|r| r.live().is_some())
            .count();
        metrics::gauge!("causeway_tunnel_connections", "direction" => "out").set(n as f64);
    }

    /// A live connection to one replica of `site`, chosen by weight among
    /// the replicas that are up; dials if none is. Replicas without a
    /// connection are dialed in the background, so each one gets its own.
    pub async fn connection(
        &self,
        site: &SiteName,
        route: &SiteRoute,
    ) -> Result<quinn::Connection, DialError> {
        if route.tunnel_addrs.is_empty() {
            return Err(DialError::NoAddress(site.clone()));
        }
        match self.plan(site, route) {
            Plan::Use(conn) => Ok(conn),
            Plan::Wait => self.wait_for_first_dial(site).await,
            Plan::Dial { candidates, early } => self.dial_now(site, candidates, early).await,
        }
    }

    /// Picks a live replica by weight (bringing the idle ones up in the
    /// background), or says what to dial or wait for.
    fn plan(&self, site: &SiteName, route: &SiteRoute) -> Plan {
        let mut sites = self.lock();
        let sp = synced(&mut sites, site, route);
        let stats: Vec<EndpointStats> = sp
            .replicas
            .iter()
            .map(|r| EndpointStats {
                weight: r.at.weight,
                healthy: r.live().is_some(),
                ..EndpointStats::default()
            })
            .collect();
        let picked = sp
            .balancer
            .pick(&stats, rand::random())
            .and_then(|i| sp.replicas[i].live().cloned());
        let idle: Vec<TunnelAddr> = sp
            .replicas
            .iter_mut()
            .filter(|r| r.live().is_none() && !r.dialing)
            .map(|r| {
                r.dialing = true;
                r.at
            })
            .collect();
        if let Some(conn) = picked {
            // Bring the other replicas up without holding this stream.
            for at in idle {
                self.spawn_dial(site.clone(), at, Duration::ZERO);
            }
            return Plan::Use(conn);
        }
        // A first dial already under way (not a redial in backoff):
        // wait for it below rather than fail.
        let first_dial = idle.is_empty()
            && sp
                .replicas
                .iter()
                .any(|r| r.dialing && r.failures == 0 && r.live().is_none());
        if first_dial {
            Plan::Wait
        } else if idle.is_empty() {
            // Every replica waits out a backoff. Streams come here only
            // when no other site could take them (a site with its
            // tunnels down is tried last), so dial early rather than
            // fail: a peer that just restarted is back at once. One
            // early dial per replica per EARLY_DIAL_EVERY; the others
            // fail fast as before.
            let now = std::time::Instant::now();
            if sp.replicas.iter().any(|r| r.early_dialing) {
                Plan::Wait // for the early dial under way
            } else {
                let early: Vec<TunnelAddr> = sp
                    .replicas
                    .iter_mut()
                    .filter(|r| r.live().is_none())
                    .filter(|r| r.early_at.is_none_or(|t| now - t >= EARLY_DIAL_EVERY))
                    .map(|r| {
                        r.early_at = Some(now);
                        r.early_dialing = true;
                        r.at
                    })
                    .collect();
                Plan::Dial {
                    candidates: early,
                    early: true,
                }
            }
        } else {
            Plan::Dial {
                candidates: idle,
                early: false,
            }
        }
    }

    /// Waits (up to the dial timeout) for a dial under way to bring a
    /// replica up.
    async fn wait_for_first_dial(&self, site: &SiteName) -> Result<quinn::Connection, DialError> {
        let deadline = tokio::time::Instant::now() + DIAL_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let live = self.lock().get(site).and_then(|sp| {
                let up: Vec<&Replica> = sp.replicas.iter().filter(|r| r.live().is_some()).collect();
                let dialing = sp
                    .replicas
                    .iter()
                    .any(|r| (r.dialing && r.failures == 0) || r.early_dialing);
                match up.first() {
                    Some(r) => Some(r.live().cloned()),
                    None if dialing => None,
                    None => Some(None),
                }
            });
            match live {
                Some(Some(conn)) => return Ok(conn),
                Some(None) => break,
                None => continue,
            }
        }
        Err(DialError::Unreachable {
            site: site.clone(),
            last: "the first dial did not finish in time".into(),
        })
    }

    /// Dials `candidates`, heaviest first, until one connects.
    async fn dial_now(
        &self,
        site: &SiteName,
        candidates: Vec<TunnelAddr>,
        early: bool,
    ) -> Result<quinn::Connection, DialError> {
        // Early dials end with this call, however it ends (a caller's
        // timeout may drop it mid-dial): then the waiters look again.
        let _early = early.then(|| EarlyDials {
            pool: self,
            site,
            addrs: candidates.iter().map(|a| a.addr).collect(),
        });
        // Nothing is up: dial now, heaviest replica first.
        let mut order = candidates;
        order.sort_by_key(|a| std::cmp::Reverse(a.weight));
        let mut last = String::from("every replica is being redialed; retry shortly");
        for (k, at) in order.iter().enumerate() {
            match self.dial(site, at.addr).await {
                Ok(conn) => {
                    if early {
                        metrics::counter!("causeway_tunnel_early_dials_total", "result" => "ok")
                            .increment(1);
                    }
                    let Some(conn) = self.settle(site, *at, Ok(conn)) else {
                        last = format!("{}: the site left the pool", at.addr);
                        continue;
                    };
                    // The rest come up in the background (an early dial
                    // leaves them to their own backoff).
                    if !early {
                        for other in &order[k + 1..] {
                            self.spawn_dial(site.clone(), *other, Duration::ZERO);
                        }
                    }
                    return Ok(conn);
                }
                Err(e) => {
                    last = format!("{}: {e}", at.addr);
                    if early {
                        // Its backoff redial is still scheduled: no second one.
                        metrics::counter!("causeway_tunnel_early_dials_total", "result" => "error")
                            .increment(1);
                    } else {
                        self.settle(site, *at, Err(()));
                    }
                }
            }
        }
        Err(DialError::Unreachable {
            site: site.clone(),
            last,
        })
    }

    async fn dial(
        &self,
        site: &SiteName,
        addr: std::net::SocketAddr,
    ) -> Result<quinn::Connection, ReplicaDialError> {
        let td = {
            let sites = self.lock();
            match sites.get(site) {
                Some(sp) => sp.route.trust_domain.clone(),
                None => return Err(ReplicaDialError::SiteLeft),
            }
        };
        let cred = self.cred.locked().clone();
        let quic = self.quic.locked().clone();
        let cfg = tunnel::client_config(&cred, self.store.clone(), td, &quic)
            .map_err(|e| ReplicaDialError::Tls(format!("{e:#}")))?;
        let connecting = self.endpoint.connect_with(cfg, addr, "gateway")?;
        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => {
                count("ok");
                tracing::info!(%site, %addr, "tunnel connected");
                Ok(conn)
            }
            Ok(Err(e)) => {
                count("error");
                Err(e.into())
            }
            Err(_) => {
                count("error");
                Err(ReplicaDialError::TimedOut)
            }
        }
    }

    /// Records a dial's outcome. On success the connection is watched: when
    /// it closes, the replica is redialed after a backoff. On failure the
    /// next attempt is scheduled with backoff and jitter.
    /// Returns the replica's connection after a successful dial (an
    /// existing one wins a race between two dials).
    fn settle(
        &self,
        site: &SiteName,
        at: TunnelAddr,
        result: Result<quinn::Connection, ()>,
    ) -> Option<quinn::Connection> {
        let mut sites = self.lock();
        let Some(r) = sites
            .get_mut(site)
            .and_then(|sp| sp.replicas.iter_mut().find(|r| r.at.addr == at.addr))
        else {
            // The site or replica left while we dialed.
            if let Ok(c) = result {
                c.close(quinn::VarInt::from_u32(2), b"replica removed");
            }
            return None;
        };
        match result {
            Ok(conn) if r.live().is_some_and(|c| c.stable_id() != conn.stable_id()) => {
                // Two dials raced (an early one and the backoff redial):
                // keep the connection already in use.
                conn.close(quinn::VarInt::from_u32(4), b"duplicate connection");
                r.live().cloned()
            }
            Ok(conn) => {
                r.failures = 0;
                r.dialing = true; // until the watcher below sees it close
                r.conn = Some(conn.clone());
                self.hear_drain_notice(site, &conn);
                let pool = self.me.clone();
                let site = site.clone();
                let watched = conn.clone();
                tokio::spawn(async move {
                    let why = watched.closed().await;
                    let Some(pool) = pool.upgrade() else { return };
                    tracing::info!(%site, addr = %at.addr, reason = %why, "tunnel closed; redialing with backoff");
                    pool.after_close(&site, at, watched.stable_id());
                });
                Self::publish_gauge(&sites);
                Some(conn)
            }
            Err(()) => {
                r.failures += 1;
                let delay = backoff(r.failures, rand::random());
                r.dialing = true;
                drop(sites);
                self.spawn_dial(site.clone(), at, delay);
                None
            }
        }
    }

    /// Watches `conn` for the peer's drain notice (the one unidirectional
    /// stream a dialed connection accepts): on it the connection is
    /// retired like one whose peer answered `Draining`.
    fn hear_drain_notice(&self, site: &SiteName, conn: &quinn::Connection) {
        let (me, site, conn) = (self.me.clone(), site.clone(), conn.clone());
        tokio::spawn(async move {
            use causeway_gateway_core::header::{is_drain_notice, PREFIX_LEN};
            while let Ok(mut recv) = conn.accept_uni().await {
                let mut frame = [0u8; PREFIX_LEN];
                let read =
                    tokio::time::timeout(Duration::from_secs(1), recv.read_exact(&mut frame));
                if !matches!(read.await, Ok(Ok(()))) || !is_drain_notice(&frame) {
                    tracing::debug!(%site, "ignored a unidirectional stream that is no drain notice");
                    continue;
                }
                let Some(pool) = me.upgrade() else { return };
                tracing::info!(%site, remote = %conn.remote_address(), "peer gateway is draining; its tunnel takes no new streams");
                metrics::counter!("causeway_drain_notices_total", "result" => "heard").increment(1);
                pool.retire(&site, &conn);
                return;
            }
        });
    }

    fn after_close(&self, site: &SiteName, at: TunnelAddr, id: usize) {
        let delay = {
            let mut sites = self.lock();
            let Some(r) = sites
                .get_mut(site)
                .and_then(|sp| sp.replicas.iter_mut().find(|r| r.at.addr == at.addr))
            else {
                return;
            };
            if r.conn.as_ref().map(|c| c.stable_id()) != Some(id) {
                return; // already replaced
            }
            r.conn = None;
            r.failures += 1;
            let delay = backoff(r.failures, rand::random());
            Self::publish_gauge(&sites);
            delay
        };
        self.spawn_dial(site.clone(), at, delay);
    }

    /// Dials `at` after `delay`, unless the replica left the pool meanwhile.
    fn spawn_dial(&self, site: SiteName, at: TunnelAddr, delay: Duration) {
        let pool = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(pool) = pool.upgrade() else { return };
            let wanted = pool.lock().get(&site).is_some_and(|sp| {
                sp.replicas
                    .iter()
                    .any(|r| r.at.addr == at.addr && r.live().is_none())
            });
            if !wanted {
                return;
            }
            let result = pool.dial(&site, at.addr).await;
            match result {
                Ok(conn) => {
                    pool.settle(&site, at, Ok(conn));
                }
                Err(e) => {
                    tracing::debug!(%site, addr = %at.addr, error = %e, "redial failed");
                    pool.settle(&site, at, Err(()));
                }
            }
        });
    }

    /// Uses `cred` for dials from now on; connections up keep going.
    pub fn set_credential(&self, cred: Credential) {
        *self.cred.locked() = cred;
    }

    /// The credential new dials use.
    pub fn credential(&self) -> Credential {
        self.cred.locked().clone()
    }

    /// The QUIC tuning in force.
    pub fn quic(&self) -> crate::config::QuicConfig {
        self.quic.locked().clone()
    }

    /// Uses `quic` for dials from now on; connections up keep theirs.
    pub fn set_quic(&self, quic: crate::config::QuicConfig) {
        *self.quic.locked() = quic;
    }

    /// Closes and forgets connections to sites no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(&SiteName) -> bool) {
        let mut sites = self.lock();
        sites.retain(|site, sp| {
            let k = keep(site);
            if !k {
                tracing::info!(%site, "closing tunnels to a removed site");
                for r in &sp.replicas {
                    if let Some(c) = &r.conn {
                        c.close(quinn::VarInt::from_u32(2), b"site removed");
                    }
                }
            }
            k
        });
        Self::publish_gauge(&sites);
    }

    /// Retires the connections to `site` that `reject` picks (their peer's
    /// certificate no longer chains to the site's bundle): new streams go
    /// over a fresh connection, dialed at once; the old one is closed after
    /// `retire_grace_secs`, so streams in flight get that long. How many.
    pub fn retire_where(
        &self,
        site: &SiteName,
        reject: impl Fn(&quinn::Connection) -> bool,
        reason: &'static [u8],
        grace: Duration,
    ) -> usize {
        let mut redial = Vec::new();
        {
            let mut sites = self.lock();
            let Some(sp) = sites.get_mut(site) else {
                return 0;
            };
            for r in &mut sp.replicas {
                let Some(c) = r.live().cloned() else { continue };
                if reject(&c) {
                    r.conn = None;
                    r.dialing = true;
                    redial.push(r.at);
                    let id = c.stable_id();
                    self.retired.locked().insert(id);
                    let (me, closing) = (self.me.clone(), c.clone());
                    tokio::spawn(async move {
                        closing.closed().await;
                        if let Some(pool) = me.upgrade() {
                            pool.retired.locked().remove(&id);
                        }
                    });
                    close_after(c, grace, reason);
                }
            }
            Self::publish_gauge(&sites);
        }
        for at in &redial {
            self.spawn_dial(site.clone(), *at, Duration::ZERO);
        }
        redial.len()
    }

    /// Retires one connection to `site` whose peer refused a new stream
    /// with `Draining` (the peer retired its end, or is shutting down):
    /// like [`Self::retire_where`] for that connection alone. Whether it
    /// was still in the pool (a concurrent stream may have retired it).
    pub fn retire(&self, site: &SiteName, conn: &quinn::Connection) -> bool {
        let id = conn.stable_id();
        self.retire_where(
            site,
            |c| c.stable_id() == id,
            b"peer refused new streams",
            self.retire_grace,
        ) > 0
    }

    /// Whether the connection with this `stable_id` was retired (and is
    /// not closed yet): what it carries may finish, nothing new starts.
    pub fn is_retired(&self, id: usize) -> bool {
        self.retired.locked().contains(&id)
    }

    /// Closes a connection that failed to open a stream: the next stream
    /// picks another replica, and this one is redialed after a backoff.
    pub fn evict(&self, conn: &quinn::Connection) {
        conn.close(quinn::VarInt::from_u32(3), b"stream open failed");
    }

    /// The smallest smoothed round-trip time among the site's live
    /// connections (QUIC measures it continuously), if any is up.
    pub fn rtt(&self, site: &SiteName) -> Option<Duration> {
        self.lock()
            .get(site)?
            .replicas
            .iter()
            .filter_map(|r| r.live().map(|c| c.rtt()))
            .min()
    }

    /// Path statistics summed over the site's live connections: packets
    /// sent and declared lost, and the largest path MTU discovered.
    pub fn path(&self, site: &SiteName) -> Option<PathStats> {
        let pools = self.lock();
        let mut out: Option<PathStats> = None;
        for c in pools.get(site)?.replicas.iter().filter_map(|r| r.live()) {
            let s = c.stats();
            let o = out.get_or_insert_with(PathStats::default);
            o.sent += s.path.sent_packets;
            o.lost += s.path.lost_packets;
            o.mtu = o.mtu.max(s.path.current_mtu);
            o.cwnd += s.path.cwnd;
            o.congestion_events += s.path.congestion_events;
        }
        out
    }

    /// Whether `site` is unreachable from here for now: every replica lost
    /// its connection or failed its last dial and waits for a redial. A
    /// site not dialed yet, or whose first dial is under way, is not down.
    pub fn down(&self, site: &SiteName) -> bool {
        self.lock().get(site).is_some_and(|sp| {
            !sp.replicas.is_empty()
                && sp
                    .replicas
                    .iter()
                    .all(|r| r.live().is_none() && r.failures > 0)
        })
    }

    /// Dials the replicas of `site` that have no connection and are not
    /// being dialed, in the background: failover then finds a warm tunnel
    /// instead of paying a handshake on the first request.
    pub fn warm(&self, site: &SiteName, route: &SiteRoute) {
        if route.tunnel_addrs.is_empty() {
            return;
        }
        let idle: Vec<TunnelAddr> = {
            let mut sites = self.lock();
            let sp = synced(&mut sites, site, route);
            sp.replicas
                .iter_mut()
                .filter(|r| r.live().is_none() && !r.dialing)
                .map(|r| {
                    r.dialing = true;
                    r.at
                })
                .collect()
        };
        for at in idle {
            self.spawn_dial(site.clone(), at, Duration::ZERO);
        }
    }

    /// Live connections per replica address of `site` (for tests and status).
    pub fn replicas(&self, site: &SiteName) -> Vec<(TunnelAddr, bool)> {
        self.lock()
            .get(site)
            .map(|sp| {
                sp.replicas
                    .iter()
                    .map(|r| (r.at, r.live().is_some()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Closes `conn` after `grace`, from a task of its own.
pub fn close_after(conn: quinn::Connection, grace: Duration, reason: &'static [u8]) {
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(grace) => conn.close(quinn::VarInt::from_u32(4), reason),
            _ = conn.closed() => {}
        }
    });
}

/// Clears the early-dial marks of `addrs` when dropped.
struct EarlyDials<'a> {
    pool: &'a Pool,
    site: &'a SiteName,
    addrs: Vec<std::net::SocketAddr>,
}

impl Drop for EarlyDials<'_> {
    fn drop(&mut self) {
        if let Some(sp) = self.pool.lock().get_mut(self.site) {
            for r in sp
                .replicas
                .iter_mut()
                .filter(|r| self.addrs.contains(&r.at.addr))
            {
                r.early_dialing = false;
            }
        }
    }
}

/// The pool of `site`, created if new, following `route`.
fn synced<'a>(
    sites: &'a mut HashMap<SiteName, SitePool>,
    site: &SiteName,
    route: &SiteRoute,
) -> &'a mut SitePool {
    let sp = sites.entry(site.clone()).or_insert_with(|| SitePool {
        // No replicas yet: `sync` below adds them.
        route: SiteRoute {
            labels: Vec::new(),
            trust_domain: route.trust_domain.clone(),
            tunnel_addrs: Vec::new(),
        },
        replicas: Vec::new(),
        balancer: Balancer::new(Strategy::Weighted),
    });
    sp.sync(route);
    sp
}

impl SitePool {
    /// Follows the site's advertised replicas: new ones are added, weights
    /// updated, and replicas no longer advertised are closed.
    fn sync(&mut self, route: &SiteRoute) {
        if self.route == *route {
            return;
        }
        self.route = route.clone();
        self.replicas.retain(|r| {
            let keep = route.tunnel_addrs.iter().any(|a| a.addr == r.at.addr);
            if !keep {
                if let Some(c) = &r.conn {
                    c.close(quinn::VarInt::from_u32(2), b"replica removed");
                }
            }
            keep
        });
        for a in &route.tunnel_addrs {
            match self.replicas.iter_mut().find(|r| r.at.addr == a.addr) {
                Some(r) => r.at.weight = a.weight,
                None => self.replicas.push(Replica {
                    at: *a,
                    conn: None,
                    dialing: false,
                    failures: 0,
                    early_at: None,
                    early_dialing: false,
                }),
            }
        }
        // Weights or members changed: start the rotation afresh.
        self.balancer = Balancer::new(Strategy::Weighted);
    }
}

/// See [`Pool::path`]. Counts restart with each new connection.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct PathStats {
    /// UDP datagrams sent.
    pub sent: u64,
    /// Datagrams QUIC declared lost.
    pub lost: u64,
    /// The path MTU discovered, bytes.
    pub mtu: u16,
    /// Congestion windows, bytes.
    pub cwnd: u64,
    /// Times the congestion controller cut its window.
    pub congestion_events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff(1, 1.0), BACKOFF_MIN);
        assert_eq!(backoff(1, 0.0), BACKOFF_MIN / 2);
        assert_eq!(backoff(2, 1.0), BACKOFF_MIN * 2);
        assert_eq!(backoff(4, 1.0), BACKOFF_MIN * 8);
        assert_eq!(backoff(30, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX / 2);
        let a = backoff(3, 0.1);
        let b = backoff(3, 0.9);
        assert!(a < b && b <= BACKOFF_MIN * 4);
    }
}

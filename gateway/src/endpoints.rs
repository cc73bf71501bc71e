//! Per-stream choice of a local endpoint: the shell around the core's
//! balancer. Tracks in-flight streams and an EWMA of connect latency per
//! endpoint; an endpoint that refuses is skipped for this stream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_api::sync::LockExt;
use causeway_gateway_core::balance::{ewma, Balancer, EndpointStats, Strategy};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HALF_LIFE: Duration = Duration::from_secs(10);

struct State {
    balancer: Balancer,
    stats: Vec<EndpointStats>,
    updated: Vec<Option<Instant>>,
}

/// The endpoints of one exported service port.
pub struct EndpointSet {
    addrs: Vec<SocketAddr>,
    /// Each endpoint's version (subset), if it has one.
    versions: Vec<Option<String>>,
    state: Arc<Mutex<State>>,
}

/// Holds an endpoint's in-flight count for the life of a stream.
pub struct InFlight {
    state: Arc<Mutex<State>>,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.state.locked();
        if let Some(e) = s.stats.get_mut(self.index) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

impl EndpointSet {
    /// A set over `addrs`, balanced by `strategy`; all healthy at first.
    pub fn new(addrs: Vec<SocketAddr>, strategy: Strategy) -> Self {
        Self::with_versions(addrs, &Default::default(), strategy)
    }

    /// A set over `addrs`, some of them in a subset by `versions`.
    pub fn with_versions(
        addrs: Vec<SocketAddr>,
        versions: &std::collections::BTreeMap<SocketAddr, String>,
        strategy: Strategy,
    ) -> Self {
        let n = addrs.len();
        Self {
            versions: addrs.iter().map(|a| versions.get(a).cloned()).collect(),
            addrs,
            state: Arc::new(Mutex::new(State {
                balancer: Balancer::new(strategy),
                stats: vec![EndpointStats::default(); n],
                updated: vec![None; n],
            })),
        }
    }

    /// The endpoints.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether each endpoint's version is the one in `versions`.
    pub fn same_versions(&self, versions: &std::collections::BTreeMap<SocketAddr, String>) -> bool {
        self.addrs
            .iter()
            .zip(&self.versions)
            .all(|(a, v)| versions.get(a) == v.as_ref())
    }

    /// Whether any endpoint is in `subset`.
    pub fn has_subset(&self, subset: &str) -> bool {
        self.versions.iter().any(|v| v.as_deref() == Some(subset))
    }

    /// Connects to an endpoint chosen by the balancer, trying others if it
    /// refuses. `None` when no endpoint accepted.
    pub async fn connect(&self) -> Option<(TcpStream, InFlight)> {
        self.connect_subset(None).await
    }

    /// As [`EndpointSet::connect`], among the endpoints of `subset` only
    /// (all endpoints when `None`).
    pub async fn connect_subset(&self, subset: Option<&str>) -> Option<(TcpStream, InFlight)> {
        // Endpoints outside the subset count as tried from the start.
        let mut tried: Vec<bool> = self
            .versions
            .iter()
            .map(|v| subset.is_some_and(|s| v.as_deref() != Some(s)))
            .collect();
        for _ in 0..self.addrs.len() {
            let index = {
                let mut s = self.state.locked();
                let mut view = s.stats.clone();
                for (v, t) in view.iter_mut().zip(&tried) {
                    if *t {
                        v.healthy = false;
                    }
                }
                let i = s.balancer.pick(&view, rand::random())?;
                s.stats[i].in_flight += 1;
                i
            };
            let guard = InFlight {
                state: self.state.clone(),
                index,
            };
            let started = Instant::now();
            let result =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addrs[index])).await;
            let took = started.elapsed();
            {
                let mut s = self.state.locked();
                let now = Instant::now();
                let elapsed = s.updated[index]
                    .map(|t| now.duration_since(t))
                    .unwrap_or_default();
                let sample = if matches!(result, Ok(Ok(_))) {
                    took
                } else {
                    CONNECT_TIMEOUT
                };
                s.stats[index].ewma_ns = ewma(
                    s.stats[index].ewma_ns,
                    sample.as_nanos() as u64,
                    elapsed.as_nanos() as u64,
                    HALF_LIFE.as_nanos() as u64,
                )
                .max(1);
                s.updated[index] = Some(now);
            }
            match result {
                Ok(Ok(stream)) => {
                    // Requests and answers are small writes that should
                    // leave at once (an HTTP/2 frame after another).
                    let _ = stream.set_nodelay(true);
                    return Some((stream, guard));
                }
                _ => tried[index] = true,
            }
        }
        None
    }
}

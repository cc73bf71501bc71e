//! What runs against the federation while the nemesis works, and what it
//! records:
//!
//! - **register clients** do reads (linearizable), writes and
//!   compare-and-sets on three registers through the real API. A register
//!   is a `TimeoutPolicy` (`chaos/k<N>`) whose `requestMs` holds the
//!   value; every written value is unique, so "the policy was last changed
//!   at revision r" is "its value is the one written at r", and a
//!   compare-and-set is a write conditioned on that revision
//!   (`ApplyPoliciesRequest.if_revisions`). One attempt per operation: an
//!   answer that does not settle the outcome is recorded as unknown (and
//!   the client continues as a new process, as in Jepsen).
//! - **a set client** creates a new policy per operation; every
//!   acknowledged one must be there at the end.
//! - **watchers** stream catalog changes from three different nodes.
//! - **site workloads** (in each site's namespace) serve an echo service
//!   and call the other sites' services by DNS name, steadily.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_api::client::ControllerClient;
use causeway_api::pb;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tonic::Code;

use crate::history::{Entry, Op, Outcome};
use crate::watch::WatchEvent;

/// Registers per run.
pub const KEYS: u32 = 3;
/// The namespace the registers live in.
const REGISTER_NS: &str = "chaos";
/// The namespace of the set's elements.
const SET_NS: &str = "chaos-set";
/// How long one operation may take before it counts as unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// One data-plane call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Call {
    /// When it started (ns since the run's start).
    pub t_ns: u64,
    /// The calling site.
    pub from: String,
    /// The DNS name called.
    pub to: String,
    /// Whether it got its echo back.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything a run records; shared by every task.
pub struct Recorder {
    start: Instant,
    /// Set when the workloads should stop.
    pub stop: AtomicBool,
    /// Register operations.
    pub history: Mutex<Vec<Entry>>,
    /// Per watcher, what it received.
    pub watches: Mutex<BTreeMap<String, Vec<WatchEvent>>>,
    /// Data-plane calls.
    pub calls: Mutex<Vec<Call>>,
    /// Set elements whose creation was acknowledged.
    pub set_acked: Mutex<Vec<u64>>,
    /// Set elements whose creation had an unknown outcome.
    pub set_unknown: Mutex<Vec<u64>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            history: Mutex::default(),
            watches: Mutex::default(),
            calls: Mutex::default(),
            set_acked: Mutex::default(),
            set_unknown: Mutex::default(),
        })
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn push(&self, e: Entry) {
        self.history.lock().expect("recorder").push(e);
    }
}

/// One single-endpoint client per controller node.
pub type Nodes = Arc<Vec<(u64, ControllerClient)>>;

/// The register `key`'s policy document holding `value`.
fn register_doc(key: u32, value: i64) -> String {
    serde_json::json!({
        "apiVersion": "causeway.dev/v1alpha1",
        "kind": "TimeoutPolicy",
        "metadata": {"name": format!("k{key}"), "namespace": REGISTER_NS},
        "spec": {"service": format!("chaos-k{key}"), "requestMs": value},
    })
    .to_string()
}

/// A set element's policy document.
fn set_doc(n: u64) -> String {
    serde_json::json!({
        "apiVersion": "causeway.dev/v1alpha1",
        "kind": "TimeoutPolicy",
        "metadata": {"name": format!("e{n}"), "namespace": SET_NS},
        "spec": {"service": "chaos-set", "requestMs": n + 1},
    })
    .to_string()
}

/// What a write's error says about its effect: refused before anything was
/// written (`Fail`), or unknown (`Info`).
fn classify(status: &tonic::Status) -> Outcome {
    match status.code() {
        Code::Aborted
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted => Outcome::Fail,
        _ => Outcome::Info,
    }
}

/// A linearizable list of the policies of one namespace, from the leader:
/// starts at `first`, follows a refusal that names the leader, else tries
/// the next node; reads change nothing, so trying again is safe.
async fn read_ns(nodes: &Nodes, first: usize, ns: &str) -> Result<Vec<pb::Policy>, tonic::Status> {
    let mut at = first;
    let mut last = tonic::Status::unavailable("no node tried");
    for _ in 0..nodes.len() + 1 {
        let (_, client) = &nodes[at % nodes.len()];
        let answer = tokio::time::timeout(OP_TIMEOUT, async {
            let mut fed = client
                .federation()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            fed.list_policies(pb::ListPoliciesRequest {
                kind: "TimeoutPolicy".into(),
                linearizable: true,
            })
            .await
        })
        .await;
        match answer {
            Ok(Ok(r)) => {
                return Ok(r
                    .into_inner()
                    .policies
                    .into_iter()
                    .filter(|p| p.namespace == ns)
                    .collect())
            }
            Ok(Err(s)) => {
                client.rotate();
                let named = s
                    .message()
                    .split("leader: node ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
                at = match named.and_then(|id| nodes.iter().position(|(n, _)| *n == id)) {
                    Some(i) => i,
                    None => at + 1,
                };
                last = s;
            }
            Err(_) => {
                client.rotate();
                at += 1;
                last = tonic::Status::deadline_exceeded("no answer within 5 s");
            }
        }
    }
    Err(last)
}

/// A register's value and revision in a read, or `None` when absent.
fn register_value(policies: &[pb::Policy], key: u32) -> Option<(i64, u64)> {
    let p = policies.iter().find(|p| p.name == format!("k{key}"))?;
    let doc: serde_json::Value = serde_json::from_str(&p.document_json).ok()?;
    Some((doc["spec"]["requestMs"].as_i64()?, p.revision))
}

/// One write (`if_revision` 0: unconditional) on one node, one attempt.
async fn write_once(client: &ControllerClient, doc: String, if_revision: u64) -> Outcome {
    let answer = tokio::time::timeout(OP_TIMEOUT, async {
        let mut fed = client
            .federation()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        fed.apply_policies(pb::ApplyPoliciesRequest {
            documents_json: vec![doc],
            if_revisions: if if_revision == 0 {
                vec![]
            } else {
                vec![if_revision]
            },
        })
        .await
    })
    .await;
    match answer {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(s)) => {
            let o = classify(&s);
            if s.code() != Code::Aborted {
                client.rotate();
            }
            o
        }
        Err(_) => {
            client.rotate();
            Outcome::Info
        }
    }
}

/// A register client: `idx` of `n`, until the recorder stops.
pub async fn register_client(idx: u32, n: u32, nodes: Nodes, rec: Arc<Recorder>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x5157 + u64::from(idx)));
    let mut process = idx;
    let mut counter: i64 = 0;
    let mut known: BTreeMap<u32, (i64, u64)> = BTreeMap::new();
    while !rec.stopped() {
        let key = rng.random_range(0..KEYS);
        let node = rng.random_range(0..nodes.len());
        let roll = rng.random_range(0..10);
        let invoke_ns = rec.now();
        if roll < 4 || (roll >= 7 && !known.contains_key(&key)) {
            let read = read_ns(&nodes, node, REGISTER_NS).await;
            let complete_ns = rec.now();
            if let Ok(policies) = read {
                for k in 0..KEYS {
                    let v = register_value(&policies, k);
                    if let Some(v) = v {
                        known.insert(k, v);
                    }
                    rec.push(Entry {
                        process,
                        key: k,
                        op: Op::Read {
                            value: v.map(|(value, _)| value),
                        },
                        outcome: Outcome::Ok,
                        invoke_ns,
                        complete_ns: Some(complete_ns),
                    });
                }
            }
        } else {
            counter += 1;
            let value = i64::from(idx + 1) * 100_000 + counter;
            let (op, if_rev) = if roll < 7 {
                (Op::Write { value }, 0)
            } else {
                let (expect, rev) = known[&key];
                (Op::Cas { expect, new: value }, rev)
            };
            let outcome = write_once(&nodes[node].1, register_doc(key, value), if_rev).await;
            let complete_ns = rec.now();
            rec.push(Entry {
                process,
                key,
                op,
                outcome,
                invoke_ns,
                complete_ns: (outcome != Outcome::Info).then_some(complete_ns),
            });
            if outcome == Outcome::Info {
                // Its operation may still take effect: it stays open, and
                // this client goes on as a new process.
                process += n;
            }
        }
        let pause = rng.random_range(10..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The set client: a new element every 200 ms, each on a random node.
pub async fn set_client(nodes: Nodes, rec: Arc<Recorder>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7);
    let mut next: u64 = 0;
    while !rec.stopped() && next < 5_000 {
        let node = rng.random_range(0..nodes.len());
        match write_once(&nodes[node].1, set_doc(next), 0).await {
            Outcome::Ok => rec.set_acked.lock().expect("recorder").push(next),
            Outcome::Info => rec.set_unknown.lock().expect("recorder").push(next),
            Outcome::Fail => {}
        }
        next += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The elements present now (a linearizable read), after the run.
pub async fn set_present(nodes: &Nodes) -> Result<Vec<u64>, tonic::Status> {
    let policies = read_ns(nodes, 0, SET_NS).await?;
    Ok(policies
        .iter()
        .filter_map(|p| p.name.strip_prefix('e')?.parse().ok())
        .collect())
}

/// A watcher on one node: streams from the last revision it applied,
/// reconnecting (to the same node) whenever the stream ends.
pub async fn watcher(name: String, client: ControllerClient, rec: Arc<Recorder>) {
    let mut from = 0;
    while !rec.stopped() {
        let stream = async {
            let mut fed = client
                .federation()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            fed.watch(pb::WatchRequest {
                from_revision: from,
                ..Default::default()
            })
            .await
        };
        let mut s = match tokio::time::timeout(OP_TIMEOUT, stream).await {
            Ok(Ok(r)) => r.into_inner(),
            _ => {
                client.rotate();
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), s.message()).await;
            if rec.stopped() {
                return;
            }
            let ev = match next {
                Err(_) => continue,
                Ok(Ok(Some(ev))) => ev,
                Ok(_) => break,
            };
            let recorded = match ev.kind {
                Some(pb::watch_event::Kind::Snapshot(_)) => WatchEvent::Snapshot {
                    revision: ev.revision,
                },
                Some(pb::watch_event::Kind::Delta(d)) => WatchEvent::Delta {
                    revision: ev.revision,
                    digest: digest(&d.encode_to_vec()),
                },
                None => continue,
            };
            from = ev.revision;
            rec.watches
                .lock()
                .expect("recorder")
                .entry(name.clone())
                .or_default()
                .push(recorded);
        }
        client.rotate();
    }
}

fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A site's workload, on a thread of its own in the site's namespace: an
/// echo server (banner: the site's name) on its loopback, and — once
/// `calling` is set — calls to `targets` by DNS name through `dns`, four
/// a second each.
pub fn site_workload(
    site: String,
    netns: String,
    dns: Arc<Mutex<Option<SocketAddr>>>,
    targets: Vec<(String, u16)>,
    rec: Arc<Recorder>,
    calling: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let handle = std::thread::Builder::new()
        .name(format!("site-{site}"))
        .spawn(move || {
            let setup = || -> anyhow::Result<tokio::runtime::Runtime> {
                crate::sys::enter_netns(&netns)?;
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            };
            let rt = match setup() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let addr = SocketAddr::from(([127, 0, 0, 1], crate::cluster::ECHO_PORT));
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::spawn(echo(listener, site.clone()));
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                while !rec.stopped() {
                    tick.tick().await;
                    if !calling.load(Ordering::Relaxed) {
                        continue;
                    }
                    let Some(server) = *dns.lock().expect("dns") else {
                        continue;
                    };
                    for (name, port) in &targets {
                        tokio::spawn(call(site.clone(), server, name.clone(), *port, rec.clone()));
                    }
                }
            });
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the workload thread of a site died at start"))??;
    Ok(handle)
}

async fn echo(listener: tokio::net::TcpListener, banner: String) {
    use tokio::io::AsyncWriteExt;
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let banner = banner.clone();
        tokio::spawn(async move {
            if sock
                .write_all(format!("{banner}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (mut r, mut w) = sock.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn call(from: String, dns: SocketAddr, name: String, port: u16, rec: Arc<Recorder>) {
    let t_ns = rec.now();
    let r = tokio::time::timeout(Duration::from_secs(4), async {
        let ips = causeway::local::dns_a(dns, &name).await?;
        let ip = ips.first().ok_or_else(|| anyhow::anyhow!("no A record"))?;
        causeway::local::call_banner(SocketAddr::new(*ip, port), "chaos").await
    })
    .await;
    let error = match r {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("no answer within 4 s".into()),
    };
    rec.calls.lock().expect("recorder").push(Call {
        t_ns,
        from,
        to: name,
        ok: error.is_none(),
        error,
    });
}

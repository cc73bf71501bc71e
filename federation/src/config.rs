//! Controller configuration: the human form ([`ControllerConfig`], from a
//! TOML file or the command-line flags; unknown fields refused) and its
//! validated form ([`ControllerSettings`]). Every problem is reported at
//! once, each naming its field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::config::ConfigErrors;
use causeway_api::identity::CertificateAuthority;
use serde::Deserialize;

use crate::lease::LeaseConfig;
use crate::node::{ControllerOptions, RaftTiming};
use crate::NodeId;

/// A controller node's configuration as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// This node's id (a positive integer, unique in the cluster).
    pub id: Option<u64>,
    /// gRPC listen address (API and Raft).
    pub listen: Option<String>,
    /// Address other nodes and clients use; defaults to `listen`.
    pub advertise: Option<String>,
    /// The initial voters by id, this node included.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// Where the log, vote and snapshots live.
    pub data_dir: Option<PathBuf>,
    /// Directory with the controller CA (ca.pem, ca-key.pem).
    pub ca_dir: Option<PathBuf>,
    /// Admin (metrics) listen address.
    pub admin_listen: Option<String>,
    /// Raft heartbeat interval, ms.
    pub heartbeat_ms: Option<u64>,
    /// Shortest election timeout, ms.
    pub election_timeout_min_ms: Option<u64>,
    /// Longest election timeout, ms.
    pub election_timeout_max_ms: Option<u64>,
    /// A site whose gateways stop heartbeating for this long leaves routing
    /// and DNS, ms.
    pub site_lease_ms: Option<u64>,
    /// A lapsed site heartbeating steadily this long is available again, ms.
    pub site_recover_ms: Option<u64>,
    /// Snapshot and compact the log every this many entries.
    pub snapshot_every: Option<u64>,
    /// A watcher that reads nothing for this long is cut off, ms.
    pub watch_stall_ms: Option<u64>,
    /// Start empty and wait to be added (never initialize a cluster).
    #[serde(default)]
    pub join: bool,
    /// Lifetime of the API credential a site gets at join or renewal, s
    /// (default a year; gateways renew at two thirds of it).
    pub site_credential_lifetime_secs: Option<u64>,
    /// Longest lifetime of an admin credential `ctl admin issue` or
    /// `ctl admin renew` gets, s (default 90 days).
    pub admin_credential_lifetime_secs: Option<u64>,
    /// Distributed tracing over OTLP (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub tracing: causeway_api::trace::TracingConfig,
}

/// A controller node's validated settings.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// This node's id.
    pub node_id: NodeId,
    /// Where the API and Raft listen.
    pub listen: SocketAddr,
    /// Address other nodes and clients use for this node.
    pub advertise: String,
    /// The initial voters, this node included.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the log, vote and snapshots live.
    pub data_dir: PathBuf,
    /// Directory with the controller CA.
    pub ca_dir: PathBuf,
    /// Admin (metrics) listen address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Raft timing.
    pub timing: RaftTiming,
    /// Site leases.
    pub leases: LeaseConfig,
    /// A watcher whose stream accepts nothing for this long is cut off.
    pub watch_stall: Duration,
    /// Never initialize a cluster.
    pub join_existing: bool,
    /// Lifetimes of the credentials the controllers issue.
    pub credentials: CredentialLifetimes,
    /// Distributed tracing.
    pub tracing: causeway_api::trace::TracingConfig,
}

/// Lifetimes of the credentials the controllers issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialLifetimes {
    /// A site's API credential (join and renewal).
    pub site: Duration,
    /// The longest an admin credential may live.
    pub admin: Duration,
}

impl Default for CredentialLifetimes {
    fn default() -> Self {
        Self {
            site: Duration::from_secs(365 * 86_400),
            admin: Duration::from_secs(90 * 86_400),
        }
    }
}

/// The shortest credential lifetime accepted.
const MIN_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(10);

impl ControllerConfig {
    /// Reads the TOML of a controller config file named `source`.
    pub fn from_toml(source: &str, text: &str) -> Result<Self, ConfigErrors> {
        toml::from_str(text).map_err(|e| ConfigErrors::toml(source, e))
    }

    /// Checks every field; all problems at once.
    pub fn validate(&self) -> Result<ControllerSettings, ConfigErrors> {
        let mut errs = ConfigErrors::new();
        let node_id = match self.id {
            Some(0) | None => {
                errs.push("id", "required, a positive integer");
                0
            }
            Some(i) => i,
        };
        let listen = match &self.listen {
            None => {
                errs.push("listen", "required");
                None
            }
            Some(s) => errs.addr("listen", s),
        };
        let advertise = self
            .advertise
            .clone()
            .or_else(|| self.listen.clone())
            .unwrap_or_default();
        let peers = self.peers(node_id, &advertise, &mut errs);
        let data_dir = self.data_dir.clone().unwrap_or_else(|| {
            errs.push("data_dir", "required");
            PathBuf::new()
        });
        let ca_dir = self.ca_dir.clone().unwrap_or_else(|| {
            errs.push(
                "ca_dir",
                "required (create one with `causeway ca init --dir DIR`)",
            );
            PathBuf::new()
        });
        let admin_listen = self
            .admin_listen
            .as_deref()
            .and_then(|a| errs.addr("admin_listen", a));
        let timing = self.timing(&mut errs);
        let leases = self.leases(&mut errs);
        let watch_stall = Duration::from_millis(self.watch_stall_ms.unwrap_or(10_000));
        if watch_stall < Duration::from_millis(100) {
            errs.push("watch_stall_ms", "at least 100");
        }
        let credentials = self.credential_lifetimes(&mut errs);
        let mut trace_errs = Vec::new();
        self.tracing.check(&mut trace_errs);
        for e in trace_errs {
            match e.split_once(": ") {
                Some((field, why)) => errs.push(field, why),
                None => errs.push("tracing", &e),
            }
        }
        errs.into_result(|| ControllerSettings {
            node_id,
            listen: listen.expect("checked"),
            advertise,
            peers,
            data_dir,
            ca_dir,
            admin_listen,
            timing,
            leases,
            watch_stall,
            join_existing: self.join,
            credentials,
            tracing: self.tracing.clone(),
        })
    }

    fn credential_lifetimes(&self, errs: &mut ConfigErrors) -> CredentialLifetimes {
        let mut c = CredentialLifetimes::default();
        for (field, value, into) in [
            (
                "site_credential_lifetime_secs",
                self.site_credential_lifetime_secs,
                &mut c.site,
            ),
            (
                "admin_credential_lifetime_secs",
                self.admin_credential_lifetime_secs,
                &mut c.admin,
            ),
        ] {
            if let Some(secs) = value {
                let d = Duration::from_secs(secs);
                if d < MIN_CREDENTIAL_LIFETIME || secs > 10 * 365 * 86_400 {
                    errs.push(field, "between 10 and 315360000 (ten years)");
                }
                *into = d;
            }
        }
        c
    }

    /// The initial voters: this node alone when none are listed.
    fn peers(
        &self,
        node_id: NodeId,
        advertise: &str,
        errs: &mut ConfigErrors,
    ) -> BTreeMap<NodeId, String> {
        let mut peers = BTreeMap::new();
        for (k, v) in &self.peers {
            match (k.parse::<u64>(), v.parse::<SocketAddr>()) {
                (Ok(pid), Ok(_)) if pid > 0 => {
                    peers.insert(pid, v.clone());
                }
                _ => errs.push(
                    &format!("peer {k}={v}"),
                    "expected ID=HOST:PORT with a positive ID, e.g. 1=127.0.0.1:7001",
                ),
            }
        }
        if peers.is_empty() {
            peers.insert(node_id, advertise.to_string());
        }
        if !peers.contains_key(&node_id) {
            errs.push(
                "peer",
                format!("the peers must include this node (id {node_id})"),
            );
        }
        peers
    }

    fn timing(&self, errs: &mut ConfigErrors) -> RaftTiming {
        let mut timing = RaftTiming::default();
        if let Some(h) = self.heartbeat_ms {
            timing.heartbeat_ms = h;
        }
        if let Some(m) = self.election_timeout_min_ms {
            timing.election_min_ms = m;
        }
        if let Some(m) = self.election_timeout_max_ms {
            timing.election_max_ms = m;
        }
        if let Some(n) = self.snapshot_every {
            if n < 10 {
                errs.push("snapshot_every", "at least 10");
            }
            timing.snapshot_every = n;
        }
        if timing.election_min_ms <= timing.heartbeat_ms
            || timing.election_max_ms <= timing.election_min_ms
        {
            errs.push(
                "election timeouts",
                "need heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms",
            );
        }
        timing
    }

    fn leases(&self, errs: &mut ConfigErrors) -> LeaseConfig {
        let mut leases = LeaseConfig::default();
        if let Some(ms) = self.site_lease_ms {
            leases.lease = Duration::from_millis(ms);
        }
        if let Some(ms) = self.site_recover_ms {
            leases.recover_after = Duration::from_millis(ms);
        }
        if leases.lease < Duration::from_millis(500) {
            errs.push("site_lease_ms", "at least 500");
        }
        leases
    }
}

impl ControllerSettings {
    /// What [`crate::node::Controller::start`] takes, with the loaded CA.
    pub fn options(&self, ca: CertificateAuthority) -> ControllerOptions {
        ControllerOptions {
            node_id: self.node_id,
            advertise: self.advertise.clone(),
            peers: self.peers.clone(),
            data_dir: self.data_dir.clone(),
            ca: Arc::new(ca),
            timing: self.timing.clone(),
            leases: self.leases,
            watch_stall: self.watch_stall,
            join_existing: self.join_existing,
            credentials: self.credentials,
            tracing: self.tracing.clone(),
            // What `causeway ca init` wrote beside the CA: recorded as the
            // first admin credential when none is.
            bootstrap_admin_pem: std::fs::read_to_string(self.ca_dir.join("admin.pem")).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let cfg = ControllerConfig::from_toml(
            "c.toml",
            "id = 0\nlisten = \"nope\"\nsnapshot_every = 3\nheartbeat_ms = 900\nsite_lease_ms = 10\n[peers]\n2 = \"x\"\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err().0;
        for want in [
            "id: required",
            "listen: \"nope\" is not an ip:port address",
            "peer 2=x: expected ID=HOST:PORT",
            "data_dir: required",
            "ca_dir: required",
            "snapshot_every: at least 10",
            "election timeouts: need heartbeat_ms",
            "site_lease_ms: at least 500",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{want:?} not in {errs:?}"
            );
        }
    }

    #[test]
    fn a_minimal_config_takes_the_defaults() {
        let cfg = ControllerConfig::from_toml(
            "",
            "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"d\"\nca_dir = \"c\"\n",
        )
        .unwrap();
        let s = cfg.validate().unwrap();
        assert_eq!(s.peers, BTreeMap::from([(1, "127.0.0.1:7001".to_string())]));
        assert_eq!(s.watch_stall, Duration::from_secs(10));
        assert_eq!(s.timing.heartbeat_ms, RaftTiming::default().heartbeat_ms);
        let err = ControllerConfig::from_toml("c.toml", "bogus = 1").unwrap_err();
        assert!(
            err.0[0].starts_with("c.toml: ") && err.0[0].contains("unknown field `bogus`"),
            "{err}"
        );
    }
}

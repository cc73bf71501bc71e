//! Configuration reload without a restart: on SIGHUP, and when the config
//! file changes (its modification time or size, looked at every two
//! seconds), the gateway reads the file again. A config that does not
//! validate is refused whole — the running one stays, the errors are
//! logged and `causeway_config_reload_failed` reads 1 until a good one
//! arrives. A good one takes effect at once for what can change live:
//!
//! - `exports` (not on Kubernetes, where the agent owns them): published
//!   and served from at once;
//! - `allow` / `authorization`: checked on every new stream;
//! - `quic`: for tunnels made from now on (quinn fixes a connection's
//!   transport parameters at its handshake; tunnels up keep theirs).
//!
//! A change to any other field is logged as needing a restart.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{GatewayConfig, Settings};
use crate::exports::Exports;
use crate::inbound::Inbound;
use crate::pool::Pool;
use causeway_api::reload::{self, FileWatch};
use causeway_api::trust::TrustStore;

/// What the reload task works on.
pub struct Live {
    /// The config file.
    pub path: PathBuf,
    /// A replica name given outside the file (`--replica`), kept.
    pub replica: Option<String>,
    /// The site's exports.
    pub exports: Arc<Exports>,
    /// The inbound side (allow rules).
    pub inbound: Arc<Inbound>,
    /// The dialing side (QUIC tuning of new dials).
    pub pool: Arc<Pool>,
    /// The tunnel endpoint (QUIC tuning of new handshakes).
    pub endpoint: quinn::Endpoint,
    /// The trust bundles (for a new server config).
    pub store: Arc<TrustStore>,
}

/// Reads and validates the file; the raw config and the settings.
fn read(path: &PathBuf, replica: &Option<String>) -> Result<(GatewayConfig, Settings), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut config = GatewayConfig::from_toml(&text).map_err(|e| e.to_string())?;
    if let Some(r) = replica {
        config.replica = r.clone();
    }
    let settings = config.validate().map_err(|e| e.to_string())?;
    Ok((config, settings))
}

/// Follows the config file until the task is dropped.
pub async fn follow(live: Live, mut config: GatewayConfig, mut current: Settings) {
    let mut watch = FileWatch::new(live.path.clone());
    loop {
        let why = watch.next().await;
        match read(&live.path, &live.replica) {
            Err(errors) => reload::refused(why, &errors),
            Ok((new_config, new)) => {
                let changed = apply(&live, &current, &new);
                let restart = needs_restart(&config, &new_config);
                if !restart.is_empty() {
                    tracing::warn!(fields = ?restart, "these changes take effect at the next restart");
                }
                reload::applied(why, &changed);
                // What is not live stays as started, so a later reload
                // still sees those fields as changed.
                config = keep_static(&config, new_config);
                current = new;
            }
        }
    }
}

/// Puts the live-changeable parts of `new` in force; what changed.
fn apply(live: &Live, current: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if !current.kubernetes && new.exports != current.exports {
        live.exports.replace(new.exports.clone());
        changed.push("exports");
    }
    if new.authorization != current.authorization {
        live.inbound.set_authorization(new.authorization.clone());
        changed.push("allow");
    }
    if new.quic != current.quic {
        live.pool.set_quic(new.quic.clone());
        match crate::tunnel::server_config(&live.pool.credential(), live.store.clone(), &new.quic) {
            Ok(server) => {
                live.endpoint.set_server_config(Some(server));
                changed.push("quic");
            }
            Err(e) => {
                tracing::error!(error = %e, "the new quic settings do not make a server config; new handshakes keep the old ones")
            }
        }
    }
    changed
}

/// `new` with the fields that change live copied from `old`.
fn static_part(old: &GatewayConfig, new: &GatewayConfig) -> GatewayConfig {
    let mut n = new.clone();
    n.exports = old.exports.clone();
    n.allow = old.allow.clone();
    n.authorization = old.authorization.clone();
    n.quic = old.quic.clone();
    n
}

/// The top-level fields changed that only a restart puts in force.
fn needs_restart(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let a: toml::Table = toml::from_str(&old.to_toml()).unwrap_or_default();
    let b: toml::Table = toml::from_str(&static_part(old, new).to_toml()).unwrap_or_default();
    let mut keys: Vec<String> = a.keys().chain(b.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| a.get(k) != b.get(k)).collect()
}

/// What the running gateway holds after a reload: the live fields from
/// `new`, the rest as started.
fn keep_static(started: &GatewayConfig, new: GatewayConfig) -> GatewayConfig {
    let mut kept = started.clone();
    kept.exports = new.exports;
    kept.allow = new.allow;
    kept.authorization = new.authorization;
    kept.quic = new.quic;
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fields_without_a_live_path_need_a_restart() {
        let old = GatewayConfig::from_toml("state_dir = \"/s\"\n").unwrap();
        let mut new = old.clone();
        new.quic.rtt_ms = 10.0;
        new.authorization = "deny".into();
        assert!(needs_restart(&old, &new).is_empty());
        new.vip_range = "127.99.0.0/24".into();
        new.drain_secs += 1.0;
        let mut r = needs_restart(&old, &new);
        r.sort();
        assert_eq!(r, vec!["drain_secs", "vip_range"]);
        let kept = keep_static(&old, new);
        assert_eq!(kept.vip_range, old.vip_range);
        assert_eq!(kept.quic.rtt_ms, 10.0);
    }
}

//! Site leases, decided by the leader (pure: time is an input).
//!
//! A site is available while its gateways heartbeat. When no heartbeat has
//! arrived for `lease`, the leader proposes the site unavailable; its
//! exports stay in the catalog but it leaves routing and DNS answers. To
//! come back, a site must heartbeat steadily for `recover_after` — so a
//! flapping site does not churn the catalog. A new leader gives every site
//! a full lease before judging it, since it has seen no heartbeats yet.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use causeway_api::model::SiteName;

/// How site leases behave.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// A site silent this long is unavailable.
    pub lease: Duration,
    /// A lapsed site heartbeating steadily this long is available again.
    pub recover_after: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            recover_after: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    last: Instant,
    /// Start of the current run of heartbeats without a gap of `lease`.
    streak_start: Instant,
}

/// Site leases, kept by the leader in memory (pure: time is an input).
#[derive(Debug)]
pub struct Leases {
    cfg: LeaseConfig,
    seen: HashMap<SiteName, Seen>,
    leader_since: Option<Instant>,
}

impl Leases {
    /// No site seen yet.
    pub fn new(cfg: LeaseConfig) -> Self {
        Self {
            cfg,
            seen: HashMap::new(),
            leader_since: None,
        }
    }

    /// The lease settings.
    pub fn config(&self) -> LeaseConfig {
        self.cfg
    }

    /// Records a heartbeat of `site` at `now`.
    pub fn handle_heartbeat(&mut self, site: SiteName, now: Instant) {
        let lease = self.cfg.lease;
        self.seen
            .entry(site)
            .and_modify(|s| {
                if now.saturating_duration_since(s.last) > lease {
                    s.streak_start = now;
                }
                s.last = now;
            })
            .or_insert(Seen {
                last: now,
                streak_start: now,
            });
    }

    /// Called on every tick with whether this node leads.
    pub fn handle_leadership(&mut self, leader: bool, now: Instant) {
        match (leader, self.leader_since) {
            (true, None) => self.leader_since = Some(now),
            (false, Some(_)) => self.leader_since = None,
            _ => {}
        }
    }

    /// The availability changes to propose, given each member site's
    /// current availability in the catalog.
    pub fn decide(&self, now: Instant, sites: &[(SiteName, bool)]) -> Vec<(SiteName, bool)> {
        let Some(since) = self.leader_since else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (site, available) in sites {
            let seen = self.seen.get(site);
            // Not judged before a full lease under this leader.
            let last = seen.map(|s| s.last.max(since)).unwrap_or(since);
            let lapsed = now.saturating_duration_since(last) > self.cfg.lease;
            if *available && lapsed {
                out.push((site.clone(), false));
            } else if !*available {
                if let Some(s) = seen {
                    let fresh = now.saturating_duration_since(s.last) <= self.cfg.lease;
                    let steady =
                        now.saturating_duration_since(s.streak_start) >= self.cfg.recover_after;
                    if fresh && steady {
                        out.push((site.clone(), true));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: &str) -> SiteName {
        n.parse().unwrap()
    }

    #[test]
    fn lapse_hysteresis_and_new_leader_grace() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Leases::new(LeaseConfig {
            lease: ms(5000),
            recover_after: ms(2000),
        });
        let east = s("east");
        // Followers decide nothing.
        assert!(l
            .decide(t0 + ms(60_000), &[(east.clone(), true)])
            .is_empty());

        l.handle_leadership(true, t0);
        // Never seen, but the new leader waits a full lease.
        assert!(l.decide(t0 + ms(4000), &[(east.clone(), true)]).is_empty());
        assert_eq!(
            l.decide(t0 + ms(5001), &[(east.clone(), true)]),
            [(east.clone(), false)]
        );

        // Heartbeats resume: not back until steady for 2 s.
        l.handle_heartbeat(east.clone(), t0 + ms(10_000));
        assert!(l
            .decide(t0 + ms(10_500), &[(east.clone(), false)])
            .is_empty());
        l.handle_heartbeat(east.clone(), t0 + ms(11_000));
        l.handle_heartbeat(east.clone(), t0 + ms(12_000));
        assert_eq!(
            l.decide(t0 + ms(12_000), &[(east.clone(), false)]),
            [(east.clone(), true)]
        );

        // Healthy: nothing to do.
        assert!(l
            .decide(t0 + ms(13_000), &[(east.clone(), true)])
            .is_empty());

        // A flap: a long gap restarts the streak.
        l.handle_heartbeat(east.clone(), t0 + ms(30_000));
        assert!(l
            .decide(t0 + ms(31_000), &[(east.clone(), false)])
            .is_empty());
    }
}

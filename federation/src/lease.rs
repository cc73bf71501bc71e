//! Site leases, decided by the leader (pure: time is an input).
//!
//! A site is available while its gateways heartbeat. When no heartbeat has
//! arrived for `lease`, the leader proposes the site unavailable; its
//! exports stay in the catalog but it leaves routing and DNS answers. To
//! come back, a site must heartbeat steadily for `recover_after` — so a
//! flapping site does not churn the catalog. A new leader gives every site
//! two full leases before judging it: it has seen no heartbeats yet, and
//! gateways need time to find it after a leadership change (they may be
//! talking to a controller cut off from it). The chaos suite saw a leader
//! elected during a partition lapse every site one lease after it won.

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
            // Not judged before two full leases under this leader.
            let grace = since + self.cfg.lease;
            let last = seen.map(|s| s.last.max(grace)).unwrap_or(grace);
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
        // Never seen, but the new leader waits two full leases.
        assert!(l.decide(t0 + ms(9000), &[(east.clone(), true)]).is_empty());
        assert_eq!(
            l.decide(t0 + ms(10_001), &[(east.clone(), true)]),
            [(east.clone(), false)]
        );

        // Heartbeats resume: not back until steady for 2 s.
        l.handle_heartbeat(east.clone(), t0 + ms(15_000));
        assert!(l
            .decide(t0 + ms(15_500), &[(east.clone(), false)])
            .is_empty());
        l.handle_heartbeat(east.clone(), t0 + ms(16_000));
        l.handle_heartbeat(east.clone(), t0 + ms(17_000));
        assert_eq!(
            l.decide(t0 + ms(17_000), &[(east.clone(), false)]),
            [(east.clone(), true)]
        );

        // Healthy: nothing to do.
        assert!(l
            .decide(t0 + ms(18_000), &[(east.clone(), true)])
            .is_empty());

        // Silent for a lease once the grace is over: lapsed.
        assert_eq!(
            l.decide(t0 + ms(22_001), &[(east.clone(), true)]),
            [(east.clone(), false)]
        );

        // A flap: a long gap restarts the streak.
        l.handle_heartbeat(east.clone(), t0 + ms(35_000));
        assert!(l
            .decide(t0 + ms(36_000), &[(east.clone(), false)])
            .is_empty());
    }
}

//! Traffic decisions, sans IO: which sites form which failover tier, how
//! much load each tier takes given its health, which site one request goes
//! to, when a site is ejected for failing, whether a retry fits the budget,
//! whether a circuit breaker admits, and which faults to inject. Callers
//! bring the clock (milliseconds) and the random numbers (`[0, 1)`), so
//! every function here has one exact answer for its inputs.

use std::collections::BTreeMap;

/// One site that exports the service, as the caller's gateway sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteView<'a> {
    /// The site's name.
    pub site: &'a str,
    /// Endpoints passing health checks.
    pub healthy: u32,
    /// Endpoints in total (healthy or not).
    pub total: u32,
    /// The site's labels (e.g. zone and region).
    pub labels: &'a [(&'a str, &'a str)],
    /// Measured round-trip time, if known.
    pub rtt_us: Option<u64>,
    /// Ejected by outlier detection.
    pub ejected: bool,
}

impl SiteView<'_> {
    /// Share of endpoints able to serve, 0 when ejected or empty.
    pub fn health(&self) -> f64 {
        if self.ejected || self.total == 0 {
            0.0
        } else {
            f64::from(self.healthy.min(self.total)) / f64::from(self.total)
        }
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// How sites are grouped into failover tiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tiering<'a> {
    /// The local site, then the listed sites one tier each, in order;
    /// sites not listed form a last tier.
    Ordered(&'a [&'a str]),
    /// The local site and sites sharing its value of the first key (the
    /// zone), then of the next key (the region), ..., then the rest.
    Locality(&'a [&'a str]),
    /// Each site its own tier, by measured round-trip time (the local site
    /// first; unmeasured sites last, by name).
    Nearest,
}

/// Groups the sites into tiers, best first. Every site appears in exactly
/// one tier; empty tiers are dropped; within a tier sites are by name.
pub fn tiers<'a>(local: &str, sites: &[SiteView<'a>], tiering: &Tiering<'_>) -> Vec<Vec<&'a str>> {
    let mut ranked: Vec<(usize, u64, &'a str)> = Vec::with_capacity(sites.len());
    let local_view = sites.iter().find(|s| s.site == local);
    for s in sites {
        let rank: (usize, u64) = if s.site == local {
            (0, 0)
        } else {
            match tiering {
                Tiering::Ordered(order) => match order.iter().position(|o| *o == s.site) {
                    Some(i) => (1 + i, 0),
                    None => (1 + order.len(), 0),
                },
                Tiering::Locality(keys) => {
                    let shared = keys.iter().position(|k| {
                        let mine = local_view.and_then(|l| l.label(k));
                        mine.is_some() && mine == s.label(k)
                    });
                    (shared.unwrap_or(keys.len()), 0)
                }
                Tiering::Nearest => match s.rtt_us {
                    Some(rtt) => (1, rtt),
                    None => (2, 0),
                },
            }
        };
        ranked.push((rank.0, rank.1, s.site));
    }
    ranked.sort();
    ranked.dedup_by(|a, b| a.2 == b.2);
    let mut out: Vec<Vec<&'a str>> = Vec::new();
    let mut last: Option<(usize, u64)> = None;
    for (tier, rtt, site) in ranked {
        // Nearest: every distinct RTT its own tier.
        let key = match tiering {
            Tiering::Nearest => (tier, rtt),
            _ => (tier, 0),
        };
        if last != Some(key) {
            out.push(Vec::new());
            last = Some(key);
        }
        out.last_mut().expect("pushed").push(site);
    }
    for t in &mut out {
        t.sort_unstable();
    }
    out
}

/// The share of load each tier takes. A tier whose health (healthy share
/// of its endpoints, ejected sites counting as none) is at or above
/// `threshold` takes everything left; below it, it takes health/threshold
/// of what is left and the rest spills to the next tier. When even all
/// tiers together fall short, the shares are scaled up to sum to 1; when
/// nothing is healthy anywhere, the first tier gets everything (so that
/// failures are visible rather than silently dropped).
pub fn tier_loads(tier_health: &[f64], threshold: f64) -> Vec<f64> {
    let mut loads = vec![0.0; tier_health.len()];
    if tier_health.is_empty() {
        return loads;
    }
    let threshold = threshold.clamp(1e-6, 1.0);
    let mut left = 1.0f64;
    for (i, h) in tier_health.iter().enumerate() {
        let capacity = (h.clamp(0.0, 1.0) / threshold).min(1.0);
        let take = capacity.min(left);
        loads[i] = take;
        left -= take;
        if left <= 0.0 {
            break;
        }
    }
    let total: f64 = loads.iter().sum();
    if total <= 0.0 {
        loads[0] = 1.0;
    } else if total < 1.0 {
        for l in &mut loads {
            *l /= total;
        }
    }
    loads
}

/// Health of a tier: healthy endpoints over all endpoints of its sites.
pub fn tier_health(tier: &[&str], sites: &[SiteView<'_>]) -> f64 {
    let (mut healthy, mut total) = (0u64, 0u64);
    for s in sites.iter().filter(|s| tier.contains(&s.site)) {
        total += u64::from(s.total);
        if !s.ejected {
            healthy += u64::from(s.healthy.min(s.total));
        }
    }
    if total == 0 {
        0.0
    } else {
        healthy as f64 / total as f64
    }
}

/// Picks from `weights` (non-negative) by `r` in `[0, 1)`; `None` when
/// every weight is 0.
pub fn pick_weighted<T: Copy>(weights: &[(T, f64)], r: f64) -> Option<T> {
    let total: f64 = weights.iter().map(|(_, w)| w.max(0.0)).sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = r.clamp(0.0, 1.0) * total;
    let mut last = None;
    for (item, w) in weights {
        let w = w.max(0.0);
        if w <= 0.0 {
            continue;
        }
        last = Some(*item);
        if x < w {
            return Some(*item);
        }
        x -= w;
    }
    last
}

/// The site one request goes to, skipping `tried` (earlier attempts of
/// the same request):
///
/// - with a traffic split, by its weights among the split's sites that
///   can serve (not ejected, some healthy endpoint); if none can, the
///   failover tiers decide;
/// - otherwise a tier by `tier_loads` (with `r_tier`), then a site of that
///   tier weighted by its healthy endpoints (with `r_site`).
///
/// Sites that cannot serve are chosen only when no site can.
#[allow(clippy::too_many_arguments)]
pub fn choose_site<'a>(
    local: &str,
    sites: &[SiteView<'a>],
    tiering: &Tiering<'_>,
    threshold: f64,
    split: Option<&BTreeMap<String, u32>>,
    tried: &[&str],
    r_tier: f64,
    r_site: f64,
) -> Option<&'a str> {
    let open: Vec<SiteView<'a>> = sites
        .iter()
        .filter(|s| !tried.contains(&s.site))
        .cloned()
        .collect();
    if open.is_empty() {
        return None;
    }
    let can_serve = |s: &SiteView<'_>| !s.ejected && s.healthy > 0;
    if let Some(split) = split {
        let weights: Vec<(&'a str, f64)> = open
            .iter()
            .filter(|s| can_serve(s))
            .filter_map(|s| split.get(s.site).map(|w| (s.site, f64::from(*w))))
            .collect();
        if let Some(site) = pick_weighted(&weights, r_site) {
            return Some(site);
        }
    }
    let tiers = tiers(local, &open, tiering);
    let health: Vec<f64> = tiers.iter().map(|t| tier_health(t, &open)).collect();
    let loads = tier_loads(&health, threshold);
    let by_tier: Vec<(usize, f64)> = loads.iter().copied().enumerate().collect();
    let tier = pick_weighted(&by_tier, r_tier).unwrap_or(0);
    let in_tier: Vec<(&'a str, f64)> = open
        .iter()
        .filter(|s| tiers[tier].contains(&s.site) && can_serve(s))
        .map(|s| (s.site, f64::from(s.healthy)))
        .collect();
    if let Some(site) = pick_weighted(&in_tier, r_site) {
        return Some(site);
    }
    // The chosen tier has nobody able to serve: the first site anywhere
    // that can, else the first site of the first tier.
    tiers
        .iter()
        .flatten()
        .copied()
        .find(|name| open.iter().any(|s| s.site == *name && can_serve(s)))
        .or_else(|| tiers.first().and_then(|t| t.first().copied()))
}

/// Outlier detection parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierParams {
    /// Failures in a row that eject a site.
    pub consecutive_failures: u32,
    /// Base ejection time, ms.
    pub ejection_ms: u64,
    /// Most sites ejected at once, percent.
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct SiteRecord {
    consecutive: u32,
    ejected_until: Option<u64>,
    ejections: u32,
}

/// Passive health: a site that fails `consecutive_failures` times in a row
/// is ejected for `ejection_ms` times the number of its ejections so far
/// (capped at 10), unless that would eject more than
/// `max_ejected_percent` of the sites (one site may always be ejected).
#[derive(Debug, Clone, Default)]
pub struct Outliers {
    sites: BTreeMap<String, SiteRecord>,
}

/// What a failure report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejection {
    /// Nothing changed (or the site was ejected already).
    None,
    /// Ejected until the given time.
    Ejected(u64),
    /// Would have been ejected, but too many sites already are.
    Capped,
}

impl Outliers {
    /// Whether `site` is ejected at `now_ms`.
    pub fn is_ejected(&self, site: &str, now_ms: u64) -> bool {
        self.sites
            .get(site)
            .and_then(|r| r.ejected_until)
            .is_some_and(|t| now_ms < t)
    }

    /// Sites ejected at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> Vec<&str> {
        self.sites
            .iter()
            .filter(|(_, r)| r.ejected_until.is_some_and(|t| now_ms < t))
            .map(|(s, _)| s.as_str())
            .collect()
    }

    /// Records a success of `site`: its failure run starts over.
    pub fn on_success(&mut self, site: &str) {
        if let Some(r) = self.sites.get_mut(site) {
            r.consecutive = 0;
        }
    }

    /// Records a failure of `site`, one of `site_count` sites serving the
    /// service.
    pub fn on_failure(
        &mut self,
        site: &str,
        site_count: usize,
        params: &OutlierParams,
        now_ms: u64,
    ) -> Ejection {
        let ejected_now = self.ejected(now_ms).len();
        let r = self.sites.entry(site.to_string()).or_default();
        if r.ejected_until.is_some_and(|t| now_ms < t) {
            return Ejection::None;
        }
        r.consecutive += 1;
        if r.consecutive < params.consecutive_failures.max(1) {
            return Ejection::None;
        }
        let allowed = (site_count as u64 * u64::from(params.max_ejected_percent.min(100)) / 100)
            .max(1) as usize;
        if ejected_now + 1 > allowed {
            return Ejection::Capped;
        }
        r.ejections = (r.ejections + 1).min(10);
        r.consecutive = 0;
        let until = now_ms + params.ejection_ms * u64::from(r.ejections);
        r.ejected_until = Some(until);
        Ejection::Ejected(until)
    }

    /// A site that stayed healthy for a while forgets past ejections.
    pub fn forgive(&mut self, site: &str, now_ms: u64, params: &OutlierParams) {
        if let Some(r) = self.sites.get_mut(site) {
            if r.ejected_until
                .is_some_and(|t| now_ms >= t + params.ejection_ms * 10)
            {
                r.ejections = 0;
                r.ejected_until = None;
            }
        }
    }
}

/// A retry budget: over a sliding window of `WINDOW_S` one-second buckets,
/// retries may add at most `ratio` of the requests plus `min_per_second`
/// per second.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    /// `(second, requests, retries)`, oldest first.
    buckets: std::collections::VecDeque<(u64, u64, u64)>,
}

/// Seconds of history the budget looks at.
pub const WINDOW_S: u64 = 10;

impl RetryBudget {
    /// A budget of `ratio` of requests, and at least `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            min_per_second,
            buckets: Default::default(),
        }
    }

    fn bucket(&mut self, now_ms: u64) -> &mut (u64, u64, u64) {
        let sec = now_ms / 1000;
        while self.buckets.front().is_some_and(|b| b.0 + WINDOW_S <= sec) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.0 != sec) {
            self.buckets.push_back((sec, 0, 0));
        }
        self.buckets.back_mut().expect("pushed")
    }

    /// Counts a first try.
    pub fn on_request(&mut self, now_ms: u64) {
        self.bucket(now_ms).1 += 1;
    }

    /// Whether a retry fits; if so it is counted.
    pub fn try_retry(&mut self, now_ms: u64) -> bool {
        self.bucket(now_ms);
        let (requests, retries) = self
            .buckets
            .iter()
            .fold((0u64, 0u64), |(q, r), b| (q + b.1, r + b.2));
        let allowed = (self.ratio * requests as f64).floor() as u64
            + u64::from(self.min_per_second) * WINDOW_S;
        if retries < allowed {
            self.bucket(now_ms).2 += 1;
            true
        } else {
            false
        }
    }
}

/// Circuit breaker limits per site; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most upstream connections.
    pub max_connections: Option<u32>,
    /// Most requests waiting for a connection.
    pub max_pending: Option<u32>,
    /// Most requests in flight.
    pub max_requests: Option<u32>,
}

/// What is in flight to one site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Upstream connections open.
    pub connections: u32,
    /// Requests waiting for a connection.
    pub pending: u32,
    /// Requests in flight.
    pub requests: u32,
}

/// Which limit a new request would break, if any.
pub fn breaker(limits: &Limits, now: &InFlight) -> Option<&'static str> {
    let over = |limit: Option<u32>, n: u32| limit.is_some_and(|l| n >= l);
    if over(limits.max_requests, now.requests) {
        Some("max_requests")
    } else if over(limits.max_pending, now.pending) {
        Some("max_pending")
    } else if over(limits.max_connections, now.connections) {
        Some("max_connections")
    } else {
        None
    }
}

/// Faults to inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// Delay the request this long, ms.
    pub delay_ms: Option<u32>,
    /// Answer with this status instead of forwarding.
    pub abort_status: Option<u16>,
}

/// Decides the faults of one request: a delay with probability
/// `delay.0`% (of `delay.1` ms), an abort with probability `abort.0`%
/// (with status `abort.1`); `r_delay` and `r_abort` in `[0, 1)`.
pub fn faults(
    delay: Option<(f64, u32)>,
    abort: Option<(f64, u16)>,
    r_delay: f64,
    r_abort: f64,
) -> Faults {
    Faults {
        delay_ms: delay
            .filter(|(p, _)| r_delay * 100.0 < *p)
            .map(|(_, ms)| ms),
        abort_status: abort.filter(|(p, _)| r_abort * 100.0 < *p).map(|(_, s)| s),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NO_LABELS: &[(&str, &str)] = &[];

    fn site(name: &str, healthy: u32, total: u32) -> SiteView<'_> {
        SiteView {
            site: name,
            healthy,
            total,
            labels: NO_LABELS,
            rtt_us: None,
            ejected: false,
        }
    }

    #[test]
    fn tiers_follow_order_locality_and_rtt() {
        let z1 = [("zone", "z1"), ("region", "r1")];
        let z2 = [("zone", "z2"), ("region", "r1")];
        let z3 = [("zone", "z3"), ("region", "r2")];
        let mk = |name, labels, rtt| SiteView {
            site: name,
            healthy: 1,
            total: 1,
            labels,
            rtt_us: rtt,
            ejected: false,
        };
        let sites = [
            mk("a", &z1[..], Some(900)),
            mk("b", &z2[..], Some(300)),
            mk("c", &z3[..], None),
            mk("d", &z1[..], Some(300)),
            mk("e", &z3[..], Some(100)),
        ];
        assert_eq!(
            tiers("a", &sites, &Tiering::Ordered(&["c", "b"])),
            vec![vec!["a"], vec!["c"], vec!["b"], vec!["d", "e"]]
        );
        assert_eq!(
            tiers("a", &sites, &Tiering::Locality(&["zone", "region"])),
            vec![vec!["a", "d"], vec!["b"], vec!["c", "e"]]
        );
        assert_eq!(
            tiers("a", &sites, &Tiering::Nearest),
            vec![vec!["a"], vec!["e"], vec!["b", "d"], vec!["c"]]
        );
        // A caller with no local site: ordered from the first listed.
        assert_eq!(
            tiers("z", &sites[..3], &Tiering::Ordered(&["b"])),
            vec![vec!["b"], vec!["a", "c"]]
        );
    }

    #[test]
    fn loads_spill_below_the_threshold() {
        assert_eq!(tier_loads(&[1.0, 1.0], 0.7), vec![1.0, 0.0]);
        assert_eq!(tier_loads(&[0.7, 1.0], 0.7), vec![1.0, 0.0]);
        let l = tier_loads(&[0.35, 1.0], 0.7);
        assert!(
            (l[0] - 0.5).abs() < 1e-12 && (l[1] - 0.5).abs() < 1e-12,
            "{l:?}"
        );
        assert_eq!(tier_loads(&[0.0, 1.0, 1.0], 0.7), vec![0.0, 1.0, 0.0]);
        // Everything short: scaled up to sum to 1.
        let l = tier_loads(&[0.14, 0.14], 0.7);
        assert!(
            (l[0] - 0.5).abs() < 1e-12 && (l[1] - 0.5).abs() < 1e-12,
            "{l:?}"
        );
        assert_eq!(tier_loads(&[0.0, 0.0], 0.7), vec![1.0, 0.0]);
        assert!(tier_loads(&[], 0.7).is_empty());
    }

    #[test]
    fn a_site_without_healthy_endpoints_gets_no_request_while_another_can_serve() {
        let sites = [site("east", 0, 3), site("west", 2, 2)];
        for i in 0..100 {
            let r = i as f64 / 100.0;
            assert_eq!(
                choose_site("east", &sites, &Tiering::Nearest, 0.7, None, &[], r, r),
                Some("west")
            );
        }
        // A retry skips the site already tried; nobody left is None.
        let sites = [site("east", 2, 2), site("west", 2, 2)];
        assert_eq!(
            choose_site(
                "east",
                &sites,
                &Tiering::Nearest,
                0.7,
                None,
                &["east"],
                0.0,
                0.0
            ),
            Some("west")
        );
        assert_eq!(
            choose_site(
                "east",
                &sites,
                &Tiering::Nearest,
                0.7,
                None,
                &["east", "west"],
                0.0,
                0.0
            ),
            None
        );
        // Nobody can serve: still an answer (the first tier), so the
        // caller sees the failure.
        let sites = [site("east", 0, 2), site("west", 0, 2)];
        assert_eq!(
            choose_site("east", &sites, &Tiering::Nearest, 0.7, None, &[], 0.5, 0.5),
            Some("east")
        );
    }

    #[test]
    fn a_split_lands_exactly_on_its_weights_over_a_uniform_grid() {
        let sites = [site("east", 5, 5), site("west", 5, 5)];
        let split: BTreeMap<String, u32> = [("east".into(), 99), ("west".into(), 1)].into();
        let n = 20_000;
        let west = (0..n)
            .filter(|i| {
                let r = (*i as f64 + 0.5) / n as f64;
                choose_site(
                    "east",
                    &sites,
                    &Tiering::Nearest,
                    0.7,
                    Some(&split),
                    &[],
                    r,
                    r,
                ) == Some("west")
            })
            .count();
        assert_eq!(west, 200);
        // The canary's site down: everything to the other.
        let sites = [site("east", 5, 5), site("west", 0, 5)];
        assert_eq!(
            choose_site(
                "east",
                &sites,
                &Tiering::Nearest,
                0.7,
                Some(&split),
                &[],
                0.999,
                0.999
            ),
            Some("east")
        );
    }

    #[test]
    fn outliers_are_ejected_longer_each_time_and_capped() {
        let p = OutlierParams {
            consecutive_failures: 3,
            ejection_ms: 1000,
            max_ejected_percent: 50,
        };
        let mut o = Outliers::default();
        assert_eq!(o.on_failure("a", 4, &p, 0), Ejection::None);
        assert_eq!(o.on_failure("a", 4, &p, 1), Ejection::None);
        o.on_success("a");
        assert_eq!(o.on_failure("a", 4, &p, 2), Ejection::None);
        assert_eq!(o.on_failure("a", 4, &p, 3), Ejection::None);
        assert_eq!(o.on_failure("a", 4, &p, 4), Ejection::Ejected(1004));
        assert!(o.is_ejected("a", 1003) && !o.is_ejected("a", 1004));
        for t in 0..3 {
            o.on_failure("b", 4, &p, 10 + t);
        }
        assert_eq!(o.ejected(20), ["a", "b"]);
        // A third of four would pass 50%.
        for t in 0..2 {
            o.on_failure("c", 4, &p, 30 + t);
        }
        assert_eq!(o.on_failure("c", 4, &p, 40), Ejection::Capped);
        // Second ejection of a: twice as long.
        for t in 0..2 {
            o.on_failure("a", 4, &p, 2000 + t);
        }
        assert_eq!(o.on_failure("a", 4, &p, 2010), Ejection::Ejected(4010));
        // With one site, it may still be ejected.
        let mut one = Outliers::default();
        for t in 0..2 {
            one.on_failure("x", 1, &p, t);
        }
        assert_eq!(one.on_failure("x", 1, &p, 5), Ejection::Ejected(1005));
    }

    #[test]
    fn the_retry_budget_allows_the_ratio_plus_the_floor() {
        let mut b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.on_request(0);
        }
        let allowed = (0..100).filter(|_| b.try_retry(500)).count();
        assert_eq!(allowed, 20);
        // The window slides: ten seconds later the old requests are gone.
        assert!(!b.try_retry(10_500));
        let mut floor = RetryBudget::new(0.0, 1);
        assert_eq!((0..50).filter(|_| floor.try_retry(0)).count(), 10);
    }

    #[test]
    fn breakers_and_faults_decide_exactly() {
        let l = Limits {
            max_connections: Some(10),
            max_pending: None,
            max_requests: Some(2),
        };
        let f = |c, p, r| InFlight {
            connections: c,
            pending: p,
            requests: r,
        };
        assert_eq!(breaker(&l, &f(0, 100, 1)), None);
        assert_eq!(breaker(&l, &f(0, 0, 2)), Some("max_requests"));
        assert_eq!(breaker(&l, &f(10, 0, 0)), Some("max_connections"));
        assert_eq!(breaker(&Limits::default(), &f(1000, 1000, 1000)), None);
        let both = faults(Some((10.0, 50)), Some((100.0, 503)), 0.05, 0.99);
        assert_eq!(
            both,
            Faults {
                delay_ms: Some(50),
                abort_status: Some(503)
            }
        );
        let none = faults(Some((10.0, 50)), Some((0.0, 503)), 0.1, 0.0);
        assert_eq!(
            none,
            Faults {
                delay_ms: None,
                abort_status: None
            }
        );
    }

    fn arb_sites() -> impl Strategy<Value = Vec<(u32, u32, bool, Option<u64>)>> {
        proptest::collection::vec(
            (
                0u32..5,
                0u32..5,
                any::<bool>(),
                proptest::option::of(0u64..1000),
            ),
            1..6,
        )
    }

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    proptest! {
        #[test]
        fn loads_are_a_distribution(health in proptest::collection::vec(0.0f64..=1.0, 1..6), t in 0.01f64..=1.0) {
            let l = tier_loads(&health, t);
            let sum: f64 = l.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "{l:?}");
            prop_assert!(l.iter().all(|x| *x >= 0.0));
            if health[0] >= t {
                prop_assert_eq!(l[0], 1.0);
            }
        }

        #[test]
        fn choices_prefer_sites_that_can_serve(
            raw in arb_sites(),
            r1 in 0.0f64..1.0,
            r2 in 0.0f64..1.0,
            mode in 0usize..3,
        ) {
            let sites: Vec<SiteView<'_>> = raw
                .iter()
                .enumerate()
                .map(|(i, (h, extra, ej, rtt))| SiteView {
                    site: NAMES[i],
                    healthy: *h,
                    total: h + extra,
                    labels: NO_LABELS,
                    rtt_us: *rtt,
                    ejected: *ej,
                })
                .collect();
            let order = ["c", "a"];
            let tiering = match mode {
                0 => Tiering::Ordered(&order),
                1 => Tiering::Locality(&["zone"]),
                _ => Tiering::Nearest,
            };
            let chosen = choose_site("a", &sites, &tiering, 0.7, None, &[], r1, r2).unwrap();
            let can = |s: &SiteView<'_>| !s.ejected && s.healthy > 0;
            if sites.iter().any(can) {
                let c = sites.iter().find(|s| s.site == chosen).unwrap();
                prop_assert!(can(c), "chose {chosen} from {sites:?}");
            }
            // Tiers partition the sites.
            let t = tiers("a", &sites, &tiering);
            let mut all: Vec<&str> = t.concat();
            all.sort();
            let mut names: Vec<&str> = sites.iter().map(|s| s.site).collect();
            names.sort();
            prop_assert_eq!(all, names);
        }

        #[test]
        fn retries_never_exceed_the_budget(
            steps in proptest::collection::vec((0u64..3000, any::<bool>()), 1..400),
            ratio in 0.0f64..1.0,
            floor in 0u32..3,
        ) {
            let mut b = RetryBudget::new(ratio, floor);
            let mut now = 0;
            let mut log: Vec<(u64, bool)> = Vec::new();
            for (dt, is_retry) in steps {
                now += dt;
                if !is_retry {
                    b.on_request(now);
                    log.push((now, false));
                    continue;
                }
                if !b.try_retry(now) {
                    continue;
                }
                log.push((now, true));
                // At the moment a retry is admitted, the window holds no
                // more retries than the budget allows.
                let sec = now / 1000;
                let window: Vec<_> = log.iter().filter(|(t, _)| t / 1000 + WINDOW_S > sec).collect();
                let reqs = window.iter().filter(|(_, r)| !r).count() as f64;
                let retries = window.iter().filter(|(_, r)| *r).count() as u64;
                prop_assert!(retries <= (ratio * reqs).floor() as u64 + u64::from(floor) * WINDOW_S);
            }
        }

        #[test]
        fn never_more_ejected_than_allowed(
            fails in proptest::collection::vec((0usize..6, 0u64..50), 1..300),
            pct in 0u32..=100,
        ) {
            let p = OutlierParams { consecutive_failures: 2, ejection_ms: 500, max_ejected_percent: pct };
            let mut o = Outliers::default();
            let mut now = 0;
            for (s, dt) in fails {
                now += dt;
                o.on_failure(NAMES[s], 6, &p, now);
                let allowed = ((6 * pct / 100) as usize).max(1);
                prop_assert!(o.ejected(now).len() <= allowed);
            }
        }
    }
}

//! The default site order, for a service with no FailoverPolicy and no
//! TrafficSplit (with either, [`crate::traffic::choose_site`] decides): the
//! local site first when it exports the service, then sites with healthy
//! endpoints by name, then sites that report none (their count may be
//! stale, and trying costs one round trip). Unavailable sites never appear;
//! the gateway passes an ejected or unreachable site with no healthy
//! endpoints, so it goes last.

/// One site that exports the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The site's name.
    pub site: &'a str,
    /// Its endpoints passing health checks (0 when ejected or unreachable).
    pub healthy_endpoints: u32,
}

/// Orders candidate sites for one connection attempt.
pub fn order_sites<'a>(local: &str, candidates: &[Candidate<'a>]) -> Vec<&'a str> {
    let mut sorted: Vec<&Candidate<'a>> = candidates.iter().collect();
    sorted.sort_by_key(|c| (c.site != local, c.healthy_endpoints == 0, c.site));
    let mut out: Vec<&'a str> = Vec::with_capacity(sorted.len());
    for c in sorted {
        if !out.contains(&c.site) {
            out.push(c.site);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(site: &str, healthy: u32) -> Candidate<'_> {
        Candidate {
            site,
            healthy_endpoints: healthy,
        }
    }

    #[test]
    fn local_first_then_healthy_by_name_then_the_rest() {
        let cands = [c("west", 2), c("central", 0), c("east", 1), c("north", 3)];
        assert_eq!(
            order_sites("north", &cands),
            ["north", "east", "west", "central"]
        );
        assert_eq!(
            order_sites("south", &cands),
            ["east", "north", "west", "central"]
        );
        assert_eq!(order_sites("x", &[]), Vec::<&str>::new());
        assert_eq!(order_sites("x", &[c("a", 0), c("a", 0)]), ["a"]);
    }
}

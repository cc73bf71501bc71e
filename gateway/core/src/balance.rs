//! Choosing a local endpoint for one stream (sans-IO).
//!
//! The shell keeps an [`EndpointStats`] per endpoint (in-flight streams, an
//! EWMA of connect latency, health) and asks a [`Balancer`] for each new
//! stream, passing in the randomness it needs. Per-stream choice means one
//! long-lived client connection to the gateway does not pin a pod.

/// What the balancer knows about one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStats {
    /// Relative share of new streams.
    pub weight: u32,
    /// Streams in flight to it now.
    pub in_flight: u32,
    /// Moving average of observed latency, nanoseconds; 0 = not measured yet.
    pub ewma_ns: u64,
    /// Passing health checks.
    pub healthy: bool,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            weight: 1,
            in_flight: 0,
            ewma_ns: 0,
            healthy: true,
        }
    }
}

/// How a stream picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Power of two choices over EWMA latency × (in-flight + 1).
    #[default]
    P2cEwma,
    /// Each healthy endpoint in turn.
    RoundRobin,
    /// The healthy endpoint with the fewest streams in flight.
    LeastRequest,
    /// Smooth weighted round robin (as in nginx).
    Weighted,
}

impl Strategy {
    /// A strategy by its config name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "p2c_ewma" => Strategy::P2cEwma,
            "round_robin" => Strategy::RoundRobin,
            "least_request" => Strategy::LeastRequest,
            "weighted" => Strategy::Weighted,
            _ => return None,
        })
    }

    /// Every strategy.
    pub const ALL: [Strategy; 4] = [
        Strategy::P2cEwma,
        Strategy::RoundRobin,
        Strategy::LeastRequest,
        Strategy::Weighted,
    ];
}

/// Picks endpoints by one strategy, keeping its state between picks.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    strategy: Strategy,
    next: usize,
    current: Vec<i64>,
}

impl Balancer {
    /// A balancer for `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            next: 0,
            current: Vec::new(),
        }
    }

    /// Its strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The endpoint for the next stream, or `None` if none is healthy.
    /// `rand` is a fresh random number from the caller.
    pub fn pick(&mut self, eps: &[EndpointStats], rand: u64) -> Option<usize> {
        let healthy: Vec<usize> = (0..eps.len()).filter(|i| eps[*i].healthy).collect();
        if healthy.is_empty() {
            return None;
        }
        let pick = match self.strategy {
            Strategy::RoundRobin => {
                let start = self.next % eps.len();
                let i = (0..eps.len())
                    .map(|k| (start + k) % eps.len())
                    .find(|i| eps[*i].healthy)
                    .expect("one is healthy");
                self.next = i + 1;
                i
            }
            Strategy::LeastRequest => {
                // Ties rotate, so equal endpoints share the load.
                let start = self.next % eps.len();
                let i = (0..eps.len())
                    .map(|k| (start + k) % eps.len())
                    .filter(|i| eps[*i].healthy)
                    .min_by_key(|i| eps[*i].in_flight)
                    .expect("one is healthy");
                self.next = i + 1;
                i
            }
            Strategy::Weighted => {
                if self.current.len() != eps.len() {
                    self.current = vec![0; eps.len()];
                }
                let total: i64 = healthy.iter().map(|i| eps[*i].weight as i64).sum();
                let mut best = healthy[0];
                for &i in &healthy {
                    self.current[i] += eps[i].weight as i64;
                    if self.current[i] > self.current[best] {
                        best = i;
                    }
                }
                self.current[best] -= total;
                best
            }
            Strategy::P2cEwma => {
                if healthy.len() == 1 {
                    healthy[0]
                } else {
                    let n = healthy.len() as u64;
                    let a = (rand % n) as usize;
                    let mut b = ((rand >> 32) % (n - 1)) as usize;
                    if b >= a {
                        b += 1;
                    }
                    let cost = |i: usize| {
                        let e = &eps[healthy[i]];
                        (e.ewma_ns as u128) * (e.in_flight as u128 + 1)
                    };
                    if cost(b) < cost(a) {
                        healthy[b]
                    } else {
                        healthy[a]
                    }
                }
            }
        };
        Some(pick)
    }
}

/// Time-decayed moving average: the weight of the old value halves every
/// `half_life_ns`. Time is an input.
pub fn ewma(prev_ns: u64, sample_ns: u64, elapsed_ns: u64, half_life_ns: u64) -> u64 {
    if prev_ns == 0 || half_life_ns == 0 {
        return sample_ns;
    }
    let keep = 0.5f64.powf(elapsed_ns as f64 / half_life_ns as f64);
    (prev_ns as f64 * keep + sample_ns as f64 * (1.0 - keep)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<EndpointStats> {
        vec![EndpointStats::default(); n]
    }

    fn run(b: &mut Balancer, e: &[EndpointStats], n: usize) -> Vec<usize> {
        (0..n as u64)
            .map(|i| b.pick(e, i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap())
            .collect()
    }

    /// The battery every strategy must pass.
    #[test]
    fn every_balancer_skips_unhealthy_and_handles_edges() {
        for s in Strategy::ALL {
            let mut b = Balancer::new(s);
            assert_eq!(b.pick(&[], 1), None, "{s:?} on no endpoints");
            let mut e = eps(3);
            for x in &mut e {
                x.healthy = false;
            }
            assert_eq!(b.pick(&e, 1), None, "{s:?} with none healthy");
            e[1].healthy = true;
            assert!(
                run(&mut b, &e, 50).iter().all(|i| *i == 1),
                "{s:?} must only pick the healthy one"
            );
            let mut e = eps(4);
            e[2].healthy = false;
            let picks = run(&mut b, &e, 400);
            assert!(!picks.contains(&2), "{s:?} picked an unhealthy endpoint");
            for want in [0, 1, 3] {
                assert!(picks.contains(&want), "{s:?} never picked {want}");
            }
        }
    }

    #[test]
    fn round_robin_cycles_in_order() {
        let mut b = Balancer::new(Strategy::RoundRobin);
        let mut e = eps(3);
        assert_eq!(run(&mut b, &e, 6), [0, 1, 2, 0, 1, 2]);
        e[1].healthy = false;
        assert_eq!(run(&mut b, &e, 4), [0, 2, 0, 2]);
    }

    #[test]
    fn least_request_picks_the_least_busy_and_rotates_ties() {
        let mut b = Balancer::new(Strategy::LeastRequest);
        let mut e = eps(3);
        e[0].in_flight = 5;
        e[1].in_flight = 2;
        e[2].in_flight = 2;
        assert_eq!(run(&mut b, &e, 4), [1, 2, 1, 2]);
    }

    #[test]
    fn weighted_is_smooth() {
        let mut b = Balancer::new(Strategy::Weighted);
        let mut e = eps(3);
        e[0].weight = 5;
        // nginx's example: a a b a c a a for weights 5, 1, 1.
        assert_eq!(run(&mut b, &e, 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn p2c_prefers_the_cheaper_of_two() {
        let mut b = Balancer::new(Strategy::P2cEwma);
        let mut e = eps(2);
        e[0].ewma_ns = 1_000_000;
        e[1].ewma_ns = 100_000;
        // With two endpoints both are always sampled: the cheaper wins.
        assert!(run(&mut b, &e, 20).iter().all(|i| *i == 1));
        // Load shifts cost: 100 µs × 12 in flight > 1 ms × 1.
        e[1].in_flight = 11;
        assert!(run(&mut b, &e, 20).iter().all(|i| *i == 0));
        // Exact choice for a given random number over three endpoints.
        let mut e = eps(3);
        e[0].ewma_ns = 300;
        e[1].ewma_ns = 200;
        e[2].ewma_ns = 100;
        // rand = (b_raw << 32) | a_raw: a = 0, b_raw = 1 -> candidates 0 and 2.
        assert_eq!(b.pick(&e, 1u64 << 32), Some(2));
        // a = 1, b_raw = 0 -> candidates 1 and 0.
        assert_eq!(b.pick(&e, 1), Some(1));
    }

    #[test]
    fn ewma_decays_with_time() {
        assert_eq!(ewma(0, 500, 10, 100), 500);
        assert_eq!(ewma(1000, 0, 100, 100), 500);
        assert_eq!(ewma(1000, 0, 200, 100), 250);
        assert_eq!(ewma(1000, 1000, 7, 100), 1000);
    }
}

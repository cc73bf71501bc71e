//! Congestion control for the tunnels: a loss filter in front of quinn's
//! controllers.
//!
//! One tunnel carries every stream between two sites, so one congestion
//! controller answers for what would be many TCP connections. A loss-based
//! controller (Cubic, NewReno) cuts its window by 30–50% on every loss it
//! sees; on a path with random loss (a lossy WAN, a wireless hop) the
//! window then never grows back, and the whole tunnel runs at the rate
//! one unlucky TCP flow would get. Measured on a 30 ms, 1%-loss link:
//! 100 request streams on one tunnel served 580 echoes/s with Cubic against
//! 2,600/s for 100 TCP connections (docs/benchmarks.md, `wan-…`).
//!
//! The filter tells an isolated loss from congestion. A queue that
//! overflows drops packets in bursts; random loss drops one here and one
//! there. So a loss event reaches the controller when it is one of more
//! than `tolerance` events within one smoothed round trip, when one
//! detection declares several packets lost at once, or when the path is in
//! persistent congestion; a lone event within the window is counted and
//! otherwise ignored. ECN congestion marks always pass. `tolerance = 0` is
//! the plain controller.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Loss events the filter let through and held back, over every tunnel of
/// this process (exported as `causeway_tunnel_loss_events_total`).
pub static LOSS_EVENTS_PASSED: AtomicU64 = AtomicU64::new(0);
/// See [`LOSS_EVENTS_PASSED`].
pub static LOSS_EVENTS_IGNORED: AtomicU64 = AtomicU64::new(0);

/// Builds `inner`'s controllers behind a loss filter.
pub struct LossFilterConfig {
    /// The controller behind the filter.
    pub inner: Arc<dyn ControllerFactory + Send + Sync>,
    /// Isolated loss events per round trip that do not cut the window.
    pub tolerance: u32,
}

impl ControllerFactory for LossFilterConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossFilter {
            inner: self.inner.clone().build(now, current_mtu),
            tolerance: self.tolerance,
            mtu: u64::from(current_mtu),
            srtt: Duration::from_millis(100),
            recent: VecDeque::new(),
        })
    }
}

struct LossFilter {
    inner: Box<dyn Controller>,
    tolerance: u32,
    mtu: u64,
    srtt: Duration,
    /// When the loss events of the last round trip were seen.
    recent: VecDeque<Instant>,
}

impl LossFilter {
    /// Whether a loss event seen `now`, declaring `lost_bytes` lost, is
    /// congestion.
    fn is_congestion(&mut self, now: Instant, persistent: bool, lost_bytes: u64) -> bool {
        // ECN marks (no bytes lost) and persistent congestion always count.
        if persistent || lost_bytes == 0 || self.tolerance == 0 {
            return true;
        }
        // Several packets declared lost together: a burst, not chance.
        if lost_bytes > self.mtu {
            self.recent.clear();
            return true;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.srtt)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        if self.recent.len() > self.tolerance as usize {
            self.recent.clear();
            return true;
        }
        false
    }
}

impl Controller for LossFilter {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.srtt = rtt.get();
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.is_congestion(now, is_persistent_congestion, lost_bytes) {
            LOSS_EVENTS_PASSED.fetch_add(1, Ordering::Relaxed);
            self.inner
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        } else {
            LOSS_EVENTS_IGNORED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossFilter {
            inner: self.inner.clone_box(),
            tolerance: self.tolerance,
            mtu: self.mtu,
            srtt: self.srtt,
            recent: self.recent.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cubic(tolerance: u32) -> (Box<dyn Controller>, Instant) {
        let now = Instant::now();
        let cfg = Arc::new(LossFilterConfig {
            inner: Arc::new(quinn::congestion::CubicConfig::default()),
            tolerance,
        });
        (cfg.build(now, 1200), now)
    }

    #[test]
    fn an_isolated_loss_leaves_the_window_alone() {
        let (mut c, t0) = cubic(1);
        let w = c.window();
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, false, 1200);
        assert_eq!(
            c.window(),
            w,
            "one lost packet in a round trip is not congestion"
        );
        // The next lone loss, a round trip (100 ms before any RTT sample)
        // later, is isolated too.
        c.on_congestion_event(t0 + Duration::from_millis(300), t0, false, 1200);
        assert_eq!(c.window(), w);
    }

    #[test]
    fn repeated_or_burst_losses_cut_the_window() {
        let (mut c, t0) = cubic(1);
        let w = c.window();
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, false, 1200);
        c.on_congestion_event(t0 + Duration::from_millis(20), t0, false, 1200);
        assert!(c.window() < w, "two losses in a round trip are congestion");

        let (mut c, t0) = cubic(1);
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, false, 3 * 1200);
        assert!(c.window() < w, "three packets lost at once are congestion");

        let (mut c, t0) = cubic(1);
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, true, 1200);
        assert!(c.window() < w, "persistent congestion always counts");

        let (mut c, t0) = cubic(1);
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, false, 0);
        assert!(c.window() < w, "an ECN mark always counts");
    }

    #[test]
    fn tolerance_zero_is_the_plain_controller() {
        let (mut c, t0) = cubic(0);
        let w = c.window();
        c.on_congestion_event(t0 + Duration::from_millis(10), t0, false, 1200);
        assert!(c.window() < w);
    }
}

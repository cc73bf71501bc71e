//! Failed anonymous joins, counted per source address: past a few per
//! minute a source is told to wait, before its token is even looked at.
//! Bounded in memory whatever the number of sources.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use causeway_api::sync::LockExt;

/// Failed joins one source may make per window.
pub const FAILURES_PER_WINDOW: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at once; past it the oldest windows are dropped.
const MAX_SOURCES: usize = 4096;

/// Failures per source address in the current window.
#[derive(Default)]
pub struct JoinLimiter {
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl JoinLimiter {
    /// Whether `source` may try to join at `now`: `Err` with the time to
    /// wait when it failed too often in this window.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let m = self.by_source.locked();
        match m.get(&source) {
            Some((start, n)) if *n >= FAILURES_PER_WINDOW && now < *start + WINDOW => {
                Err(*start + WINDOW - now)
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed join from `source` at `now`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let mut m = self.by_source.locked();
        if m.len() >= MAX_SOURCES && !m.contains_key(&source) {
            m.retain(|_, (start, _)| now < *start + WINDOW);
            if m.len() >= MAX_SOURCES {
                m.clear();
            }
        }
        let e = m.entry(source).or_insert((now, 0));
        if now >= e.0 + WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_failing_too_often_waits_for_the_window_and_others_do_not() {
        let l = JoinLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..FAILURES_PER_WINDOW {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        let wait = l.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(l.check(b, t0).is_ok(), "another source is not held back");
        assert!(
            l.check(a, t0 + WINDOW).is_ok(),
            "a new window starts afresh"
        );
        l.failed(a, t0 + WINDOW);
        assert!(l.check(a, t0 + WINDOW).is_ok());
    }

    #[test]
    fn memory_stays_bounded_under_many_sources() {
        let l = JoinLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 * 3) {
            l.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.by_source.locked().len() <= MAX_SOURCES);
    }
}

//! Graceful drain: on SIGTERM a gateway stops taking new work, lets the
//! streams in flight finish up to a deadline, then closes its tunnels.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Graceful shutdown: counts streams in flight and tells when the last
/// one ends.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
    begun: Notify,
}

/// Counts one stream in flight until dropped.
pub struct StreamGuard(Arc<Drain>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Not draining, nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Streams in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Counts one more stream until the guard drops.
    pub fn guard(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Returns once draining has begun (at once if it has).
    pub async fn begun(&self) {
        let notified = self.begun.notified();
        if self.is_draining() {
            return;
        }
        notified.await;
    }

    /// Starts draining and waits until no stream is active or `deadline`
    /// passes; returns the number still active then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        self.begun.notify_waiters();
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_streams_then_gives_up_at_the_deadline() {
        let d = Drain::new();
        assert_eq!(d.drain(Duration::from_secs(1)).await, 0);
        let g = d.guard();
        let d2 = d.clone();
        let t = tokio::spawn(async move { d2.drain(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(g);
        assert_eq!(t.await.unwrap(), 0);
        let _stuck = d.guard();
        assert_eq!(d.drain(Duration::from_secs(3)).await, 1);
        assert!(d.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_hear_that_draining_began_even_if_they_come_late() {
        let d = Drain::new();
        let d2 = d.clone();
        let early = tokio::spawn(async move { d2.begun().await });
        tokio::task::yield_now().await;
        assert!(!early.is_finished());
        assert_eq!(d.drain(Duration::from_secs(1)).await, 0);
        early.await.unwrap();
        // After the start it returns at once.
        tokio::time::timeout(Duration::from_millis(1), d.begun())
            .await
            .unwrap();
    }
}

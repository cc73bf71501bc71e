//! The one way the local federation, the demo and the tests wait for
//! something to become true: poll a check until it is done or a timeout
//! passes, and say what was awaited and why it was not done yet.

use std::fmt::{Debug, Display};
use std::time::{Duration, Instant};

/// How often [`until`] asks again.
pub const POLL: Duration = Duration::from_millis(100);

/// What one look of a check in [`until`] found: done (with a value) or not
/// yet, and why not.
pub trait Check {
    /// What the wait returns once the check is done.
    type Value;
    /// `Ok` when done, else a short reason to print if the wait times out.
    fn check(self) -> Result<Self::Value, String>;
}

impl Check for bool {
    type Value = ();
    fn check(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("the condition was still false".into())
        }
    }
}

impl<T> Check for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.ok_or_else(|| "not there yet".into())
    }
}

/// `Err` is "not yet": its text is the reason shown on timeout.
impl<T, E: Display> Check for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// A check that is done when `got == want`; not yet, it shows what it got.
pub fn equals<T: PartialEq + Debug>(got: T, want: &T) -> Result<(), String> {
    if got == *want {
        Ok(())
    } else {
        Err(format!("got {got:?}, want {want:?}"))
    }
}

/// A wait that ran out of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub waited: Duration,
    /// Why the last look was not done.
    pub last: String,
}

impl Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waited {:?} for {}; last look: {}",
            self.waited, self.what, self.last
        )
    }
}

impl std::error::Error for TimedOut {}

/// Runs `check` every [`POLL`] until it is done and returns its value, or
/// fails after `timeout` naming `what` and the reason of the last look. A
/// look that hangs is cut off at the deadline, so the timeout holds.
pub async fn until<C: Check>(
    timeout: Duration,
    what: impl Display,
    mut check: impl AsyncFnMut() -> C,
) -> Result<C::Value, TimedOut> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let last = match tokio::time::timeout(left, check()).await {
            Ok(c) => match c.check() {
                Ok(v) => return Ok(v),
                Err(why) => why,
            },
            Err(_) => "the look itself did not finish before the deadline".into(),
        };
        if start.elapsed() >= timeout {
            return Err(TimedOut {
                what: what.to_string(),
                waited: timeout,
                last,
            });
        }
        tokio::time::sleep(POLL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
}

/// How often [`until_blocking`] looks.
pub const POLL_BLOCKING: Duration = Duration::from_millis(20);

/// [`until`] for callers without a runtime (process teardown in `Drop`,
/// start-up before the first `.await`): the check runs on this thread every
/// [`POLL_BLOCKING`], so each look must be quick.
pub fn until_blocking<C: Check>(
    timeout: Duration,
    what: impl Display,
    mut check: impl FnMut() -> C,
) -> Result<C::Value, TimedOut> {
    let start = Instant::now();
    loop {
        let last = match check().check() {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if start.elapsed() >= timeout {
            return Err(TimedOut {
                what: what.to_string(),
                waited: timeout,
                last,
            });
        }
        std::thread::sleep(POLL_BLOCKING.min(timeout.saturating_sub(start.elapsed())));
    }
}

/// [`until`] for tests: panics with what it waited for on timeout.
pub async fn eventually<C: Check>(
    timeout: Duration,
    what: impl Display,
    check: impl AsyncFnMut() -> C,
) -> C::Value {
    match until(timeout, what, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_once_the_check_is_done() {
        let mut n = 0;
        let got = until(Duration::from_secs(5), "n to reach 3", async || {
            n += 1;
            (n >= 3).then_some(n * 10)
        })
        .await;
        assert_eq!(got, Ok(30));
    }

    #[tokio::test]
    async fn a_timeout_names_what_was_awaited_and_the_last_reason() {
        let err = until(Duration::from_millis(300), "the moon", async || {
            Err::<(), _>("still night")
        })
        .await
        .unwrap_err();
        assert_eq!(err.what, "the moon");
        assert_eq!(err.last, "still night");
        assert!(err.to_string().contains("the moon"), "{err}");
    }

    #[tokio::test]
    async fn a_hanging_look_is_cut_off_at_the_deadline() {
        let err = until(Duration::from_millis(300), "a hang", async || {
            std::future::pending::<bool>().await
        })
        .await
        .unwrap_err();
        assert!(err.last.contains("did not finish"), "{err}");
    }

    #[test]
    fn equals_shows_what_it_got() {
        assert_eq!(equals(2, &2), Ok(()));
        assert_eq!(equals(1, &2), Err("got 1, want 2".into()));
    }

    #[test]
    fn blocking_waits_look_until_done_or_timed_out() {
        let mut n = 0;
        let got = until_blocking(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(got, Ok(3));
        let err = until_blocking(Duration::from_millis(50), "never", || false).unwrap_err();
        assert_eq!(err.what, "never");
    }

    #[tokio::test]
    #[should_panic(expected = "waited 300ms for a false flag")]
    async fn eventually_panics_with_what_it_waited_for() {
        eventually(Duration::from_millis(300), "a false flag", async || false).await;
    }
}

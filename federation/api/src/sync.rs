//! The one lock-poisoning policy: a poisoned mutex is used anyway.
//!
//! Every mutex in causeway guards a short critical section that leaves its
//! data consistent at every step (counters, maps updated by one insert or
//! remove), so the data behind a lock whose holder panicked is still valid.
//! Refusing it would turn one bug into a dead gateway or controller, and
//! skipping the work would silently stop outlier detection, leases or
//! in-flight counts. So: take the guard, always.

use std::sync::{Mutex, MutexGuard};

/// [`Mutex::lock`] under the policy above.
pub trait LockExt<T> {
    /// The guard, whether or not an earlier holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("holder dies");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), 2);
    }
}

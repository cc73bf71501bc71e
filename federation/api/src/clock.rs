//! Wall-clock time, read in one place. Commands that the controllers
//! replicate carry the proposer's reading, so applying them stays
//! deterministic; sans-IO cores take time as an input and never call this.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_time_after_this_code_was_written() {
        // 2026-01-01T00:00:00Z
        assert!(super::unix_ms() > 1_767_225_600_000);
    }
}

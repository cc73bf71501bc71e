//! The one way configuration is checked, for the controller, the gateway
//! and the DNS server alike: a serde `*Config` (unknown fields refused) is
//! validated into settings, and every problem found is reported at once,
//! each naming its field and what would be accepted.

use std::fmt::Display;
use std::net::SocketAddr;

/// Every problem found in a configuration, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl ConfigErrors {
    /// No problems yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is wrong, and why.
    pub fn push(&mut self, field: &str, problem: impl Display) {
        self.0.push(format!("{field}: {problem}"));
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing is wrong, else every problem.
    pub fn into_result<T>(self, value: impl FnOnce() -> T) -> Result<T, Self> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }

    /// `text` as an `ip:port` address; a problem with `field` if it is not.
    pub fn addr(&mut self, field: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(field, format!("{text:?} is not an ip:port address"));
                None
            }
        }
    }

    /// A TOML parse error of `source` (a file name), as one problem.
    pub fn toml(source: &str, err: impl Display) -> Self {
        let text = err.to_string();
        let text = text.trim().replace('\n', "\n    ");
        if source.is_empty() {
            Self(vec![text])
        } else {
            Self(vec![format!("{source}: {text}")])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_listed_with_its_field() {
        let mut errs = ConfigErrors::new();
        assert_eq!(
            errs.addr("listen", "127.0.0.1:53"),
            Some(([127, 0, 0, 1], 53).into())
        );
        assert!(errs.is_empty());
        assert_eq!(errs.addr("listen", "nope"), None);
        errs.push("ttl", "must be positive");
        let text = errs.clone().into_result(|| ()).unwrap_err().to_string();
        assert_eq!(
            text,
            "invalid configuration:\n  - listen: \"nope\" is not an ip:port address\n  - ttl: must be positive"
        );
        assert_eq!(ConfigErrors::new().into_result(|| 7), Ok(7));
    }
}

//! What L4 and HTTP forwarding share: the live routing table, steering
//! (which sites, in which order) and dialing (how to reach one).

use std::sync::Arc;

use tokio::sync::watch;

use crate::dial::Dialer;
use crate::routes::Routes;
use crate::steer::Steering;

/// The parts every forwarded connection or request uses.
pub struct Forward {
    /// The routing table, rebuilt on every catalog change.
    pub routes: watch::Receiver<Arc<Routes>>,
    /// Site order and passive health.
    pub steer: Arc<Steering>,
    /// Local endpoints and tunnel streams.
    pub dial: Dialer,
    /// Timeouts and connection caps.
    pub limits: crate::config::Limits,
    /// Where access log entries go.
    pub access: Arc<crate::access::AccessLog>,
    /// Spans, when tracing is on.
    pub tracing: Arc<crate::trace::Tracing>,
}

/// What records traffic: access logs and spans, and the site they name.
#[derive(Clone)]
pub struct Observers {
    /// Where access log entries go.
    pub access: Arc<crate::access::AccessLog>,
    /// Spans, when tracing is on.
    pub tracing: Arc<crate::trace::Tracing>,
    /// This site's name.
    pub site: String,
}

impl Observers {
    /// No access log, no tracing.
    pub fn off() -> Self {
        Self {
            access: crate::access::AccessLog::disabled(),
            tracing: crate::trace::Tracing::off(),
            site: String::new(),
        }
    }
}

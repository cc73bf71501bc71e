//! causeway-gateway-core: the gateway's decisions, without I/O.
//!
//! The tunnel stream header codec, the choice of site for a connection,
//! and the traffic-policy decisions ([`traffic`]): failover tiers and
//! their loads, splits, outlier ejection, retry budgets, circuit breakers
//! and fault injection.
//! No tokio, no sockets, no clock reads: the async shell in
//! `causeway-gateway` feeds bytes and state in and acts on what comes out.

pub mod balance;
pub mod failover;
pub mod header;
pub mod traffic;

pub use failover::{order_sites, Candidate};
pub use header::{HeaderError, OpenRequest, OpenResponse, Status};

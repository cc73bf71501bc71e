//! causeway-gateway-core: the gateway's decisions, without I/O.
//!
//! The tunnel stream header codec, the default site order ([`order`]),
//! the traffic-policy decisions ([`traffic`]): failover tiers and
//! their loads, splits, outlier ejection, retry budgets, circuit breakers
//! and fault injection; request routing ([`route`]); token buckets ([`ratelimit`]);
//! and JWT verification ([`jwt`]).
//! No tokio, no sockets, no clock reads: the async shell in
//! `causeway-gateway` feeds bytes and state in and acts on what comes out.

#![warn(missing_docs)]

pub mod balance;
pub mod header;
pub mod jwt;
pub mod order;
pub mod ratelimit;
pub mod route;
pub mod traffic;

pub use header::{HeaderError, OpenRequest, OpenResponse, Status};
pub use order::{order_sites, Candidate};

//! The tunnel stream header, version 1.
//!
//! Every QUIC stream a gateway opens starts with an [`OpenRequest`]; the
//! remote gateway answers with an [`OpenResponse`] before any payload.
//!
//! ```text
//! request:  "CW" | version u8 = 1 | kind u8 = 1 | body_len u16 BE | body
//!   body:   svc_len u8 | service key | port u16 | deadline_ms u32
//!           | trace_len u8 | trace context | caller_len u8 | caller identity
//!           [ | subset_len u8 | subset ]   (only when a subset is asked for,
//!                                          so older peers still read the rest)
//! response: "CW" | version u8 = 1 | status u8 | msg_len u16 BE | msg (UTF-8)
//! drain notice (on a unidirectional stream, from a gateway that begins to
//! drain to the gateways connected to it; added in 0.2.0, which reads it —
//! older gateways allow no unidirectional streams and never see it):
//!           "CW" | version u8 = 1 | kind u8 = 2 | 0u16
//! ```
//!
//! Both frames are bounded ([`MAX_BODY`], [`MAX_MESSAGE`]) and checked
//! before anything is allocated from a length the peer chose.

use thiserror::Error;

/// The first bytes of every causeway stream frame.
pub const MAGIC: [u8; 2] = *b"CW";
/// The frame version this code speaks.
pub const VERSION: u8 = 1;
const KIND_OPEN: u8 = 1;
const KIND_DRAIN: u8 = 2;
/// The whole drain notice: after it, the sender takes no new streams on
/// that connection and ends it once its streams are done.
pub const DRAIN_NOTICE: [u8; PREFIX_LEN] = [MAGIC[0], MAGIC[1], VERSION, KIND_DRAIN, 0, 0];

/// Whether `frame` (the first bytes of a unidirectional stream, at most
/// [`PREFIX_LEN`] read) is a drain notice.
pub fn is_drain_notice(frame: &[u8]) -> bool {
    frame == DRAIN_NOTICE
}
/// Fixed prefix of both frames: magic, version, kind/status, length.
pub const PREFIX_LEN: usize = 6;
/// Largest request body accepted.
pub const MAX_BODY: usize = 1024;
/// Largest response message accepted.
pub const MAX_MESSAGE: usize = 512;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Not a causeway stream.
    #[error("not a causeway stream (bad magic)")]
    BadMagic,
    /// A version this code does not speak.
    #[error("unsupported header version {0}")]
    Version(u8),
    /// A frame kind this code does not know.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The declared length, and the limit it passes.
    #[error("header length {0} exceeds the limit {1}")]
    TooLong(usize, usize),
    /// The frame ends early.
    #[error("header truncated")]
    Truncated,
    /// Bytes left after the frame.
    #[error("header has {0} trailing bytes")]
    Trailing(usize),
    /// A text field (named) is not UTF-8.
    #[error("header field {0} is not UTF-8")]
    Utf8(&'static str),
    /// A status code this code does not know.
    #[error("unknown status code {0}")]
    Status(u8),
}

/// What the caller asks the remote gateway to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// `<namespace>/<name>`; validated by the shell against the catalog.
    pub service: String,
    /// The service port asked for.
    pub port: u16,
    /// Milliseconds the caller will wait for the status; 0 = no deadline.
    pub deadline_ms: u32,
    /// Opaque trace context (e.g. a W3C traceparent), at most 255 bytes.
    pub trace: Vec<u8>,
    /// The calling workload's identity as the caller's gateway saw it.
    pub caller: String,
    /// The subset (endpoint version) to connect to; empty for any endpoint.
    pub subset: String,
}

/// The remote gateway's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected to a local endpoint; payload follows.
    Opened = 0,
    /// The service has no endpoint that accepted a connection. Retryable.
    NoEndpoints = 1,
    /// This site does not export the service (or not on that port). Retryable:
    /// the caller's catalog view may simply be behind.
    UnknownService = 2,
    /// The calling site is not allowed to call this service.
    Forbidden = 3,
    /// The request header could not be parsed.
    BadRequest = 4,
    /// The gateway is draining. Retryable.
    Draining = 5,
    /// This tunnel takes no new streams (the answering gateway retired it:
    /// the caller's certificate no longer chains to its site's bundle).
    /// Retryable over a fresh tunnel to the same site.
    Retired = 6,
    /// A RateLimit of the service refused the connection. Not retryable:
    /// trying elsewhere would only multiply the load being shed.
    RateLimited = 7,
}

impl Status {
    /// The status with this wire code.
    pub fn from_u8(v: u8) -> Result<Self, HeaderError> {
        Ok(match v {
            0 => Status::Opened,
            1 => Status::NoEndpoints,
            2 => Status::UnknownService,
            3 => Status::Forbidden,
            4 => Status::BadRequest,
            5 => Status::Draining,
            6 => Status::Retired,
            7 => Status::RateLimited,
            other => return Err(HeaderError::Status(other)),
        })
    }

    /// Whether the caller may try another site.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::NoEndpoints | Status::UnknownService | Status::Draining | Status::Retired
        )
    }

    /// Bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Opened => "opened",
            Status::NoEndpoints => "no_endpoints",
            Status::UnknownService => "unknown_service",
            Status::Forbidden => "forbidden",
            Status::BadRequest => "bad_request",
            Status::Draining => "draining",
            Status::Retired => "retired",
            Status::RateLimited => "rate_limited",
        }
    }
}

/// The exporting gateway's answer, before any payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenResponse {
    /// Opened, or why not.
    pub status: Status,
    /// Why, for logs (bounded).
    pub message: String,
}

fn check_prefix(prefix: &[u8; PREFIX_LEN]) -> Result<(), HeaderError> {
    if prefix[0..2] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if prefix[2] != VERSION {
        return Err(HeaderError::Version(prefix[2]));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        if self.buf.len() < n {
            return Err(HeaderError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HeaderError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HeaderError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, HeaderError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn short_bytes(&mut self) -> Result<&'a [u8], HeaderError> {
        let n = self.u8()? as usize;
        self.take(n)
    }

    fn short_str(&mut self, field: &'static str) -> Result<String, HeaderError> {
        let b = self.short_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| HeaderError::Utf8(field))
    }
}

fn put_short(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

impl OpenRequest {
    /// Encodes the frame. Fields longer than 255 bytes are cut, which the
    /// shell prevents by validating service keys and identities first.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        put_short(&mut body, self.service.as_bytes());
        body.extend_from_slice(&self.port.to_be_bytes());
        body.extend_from_slice(&self.deadline_ms.to_be_bytes());
        put_short(&mut body, &self.trace);
        put_short(&mut body, self.caller.as_bytes());
        if !self.subset.is_empty() {
            put_short(&mut body, self.subset.as_bytes());
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(KIND_OPEN);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Validates the fixed prefix and returns the body length to read next.
    pub fn decode_prefix(prefix: &[u8; PREFIX_LEN]) -> Result<usize, HeaderError> {
        check_prefix(prefix)?;
        if prefix[3] != KIND_OPEN {
            return Err(HeaderError::Kind(prefix[3]));
        }
        let len = u16::from_be_bytes([prefix[4], prefix[5]]) as usize;
        if len > MAX_BODY {
            return Err(HeaderError::TooLong(len, MAX_BODY));
        }
        Ok(len)
    }

    /// The request from a body whose length the prefix gave.
    pub fn decode_body(body: &[u8]) -> Result<Self, HeaderError> {
        if body.len() > MAX_BODY {
            return Err(HeaderError::TooLong(body.len(), MAX_BODY));
        }
        let mut r = Reader { buf: body };
        let req = OpenRequest {
            service: r.short_str("service")?,
            port: r.u16()?,
            deadline_ms: r.u32()?,
            trace: r.short_bytes()?.to_vec(),
            caller: r.short_str("caller")?,
            subset: String::new(),
        };
        let mut req = req;
        if !r.buf.is_empty() {
            req.subset = r.short_str("subset")?;
        }
        if !r.buf.is_empty() {
            return Err(HeaderError::Trailing(r.buf.len()));
        }
        Ok(req)
    }

    /// Decodes a whole frame from one buffer (prefix + body, nothing more).
    pub fn decode(frame: &[u8]) -> Result<Self, HeaderError> {
        let prefix: &[u8; PREFIX_LEN] = frame
            .get(..PREFIX_LEN)
            .and_then(|p| p.try_into().ok())
            .ok_or(HeaderError::Truncated)?;
        let len = Self::decode_prefix(prefix)?;
        let body = &frame[PREFIX_LEN..];
        if body.len() < len {
            return Err(HeaderError::Truncated);
        }
        if body.len() > len {
            return Err(HeaderError::Trailing(body.len() - len));
        }
        Self::decode_body(body)
    }
}

impl OpenResponse {
    /// An answer with `status` and `message` (cut to the limit).
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { status, message }
    }

    /// The answer as wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let msg = self.message.as_bytes();
        let n = msg.len().min(MAX_MESSAGE);
        let mut out = Vec::with_capacity(PREFIX_LEN + n);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.status as u8);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&msg[..n]);
        out
    }

    /// Validates the prefix; returns the status and the message length.
    pub fn decode_prefix(prefix: &[u8; PREFIX_LEN]) -> Result<(Status, usize), HeaderError> {
        check_prefix(prefix)?;
        let status = Status::from_u8(prefix[3])?;
        let len = u16::from_be_bytes([prefix[4], prefix[5]]) as usize;
        if len > MAX_MESSAGE {
            return Err(HeaderError::TooLong(len, MAX_MESSAGE));
        }
        Ok((status, len))
    }

    /// An answer from a whole frame.
    pub fn decode(frame: &[u8]) -> Result<Self, HeaderError> {
        let prefix: &[u8; PREFIX_LEN] = frame
            .get(..PREFIX_LEN)
            .and_then(|p| p.try_into().ok())
            .ok_or(HeaderError::Truncated)?;
        let (status, len) = Self::decode_prefix(prefix)?;
        let msg = &frame[PREFIX_LEN..];
        if msg.len() != len {
            return Err(if msg.len() < len {
                HeaderError::Truncated
            } else {
                HeaderError::Trailing(msg.len() - len)
            });
        }
        let message = String::from_utf8(msg.to_vec()).map_err(|_| HeaderError::Utf8("message"))?;
        Ok(Self { status, message })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_drain_notice_is_recognised_and_nothing_else_is() {
        assert!(is_drain_notice(&DRAIN_NOTICE));
        assert!(!is_drain_notice(&DRAIN_NOTICE[..5]));
        let mut other = DRAIN_NOTICE;
        other[2] = VERSION + 1;
        assert!(!is_drain_notice(&other));
        // An open request's prefix is not a notice.
        let open = OpenRequest {
            service: "a/b".into(),
            port: 1,
            deadline_ms: 0,
            trace: Vec::new(),
            caller: String::new(),
            subset: String::new(),
        }
        .encode();
        assert!(!is_drain_notice(&open[..PREFIX_LEN]));
    }

    use proptest::prelude::*;

    use super::*;

    fn sample() -> OpenRequest {
        OpenRequest {
            service: "shop/payments".into(),
            port: 8080,
            deadline_ms: 5000,
            trace: b"00-abc-01".to_vec(),
            caller: "spiffe://east.causeway/gateway/0".into(),
            subset: String::new(),
        }
    }

    #[test]
    fn request_has_the_documented_layout() {
        let bytes = OpenRequest {
            service: "a/b".into(),
            port: 80,
            deadline_ms: 1,
            trace: vec![],
            caller: "c".into(),
            subset: String::new(),
        }
        .encode();
        assert_eq!(
            bytes,
            [
                b'C', b'W', 1, 1, 0, 13, // prefix, body_len 13
                3, b'a', b'/', b'b', // service
                0, 80, // port
                0, 0, 0, 1, // deadline
                0, // trace
                1, b'c', // caller
            ]
        );
        // A subset is a field of its own after the caller; a request
        // without one is the frame an older gateway sends and reads.
        let with_subset = OpenRequest {
            service: "a/b".into(),
            port: 80,
            deadline_ms: 1,
            trace: vec![],
            caller: "c".into(),
            subset: "v2".into(),
        };
        let bytes = with_subset.encode();
        assert_eq!(&bytes[4..6], &[0, 16]);
        assert_eq!(&bytes[19..], &[2, b'v', b'2']);
        assert_eq!(OpenRequest::decode(&bytes).unwrap(), with_subset);
    }

    #[test]
    fn response_has_the_documented_layout() {
        let bytes = OpenResponse::new(Status::NoEndpoints, "none").encode();
        assert_eq!(bytes, [b'C', b'W', 1, 1, 0, 4, b'n', b'o', b'n', b'e']);
        assert_eq!(
            OpenResponse::decode(&bytes).unwrap().status,
            Status::NoEndpoints
        );
    }

    #[test]
    fn round_trip_and_errors() {
        let req = sample();
        assert_eq!(OpenRequest::decode(&req.encode()).unwrap(), req);
        let mut bad = req.encode();
        bad[0] = b'X';
        assert_eq!(OpenRequest::decode(&bad), Err(HeaderError::BadMagic));
        let mut v2 = req.encode();
        v2[2] = 2;
        assert_eq!(OpenRequest::decode(&v2), Err(HeaderError::Version(2)));
        let mut huge = req.encode();
        huge[4] = 0xff;
        assert_eq!(
            OpenRequest::decode(&huge),
            Err(HeaderError::TooLong(0xff00 | huge[5] as usize, MAX_BODY))
        );
        let cut = &req.encode()[..10];
        assert_eq!(OpenRequest::decode(cut), Err(HeaderError::Truncated));
        let long = OpenResponse::new(Status::Forbidden, "é".repeat(400));
        assert!(long.message.len() <= MAX_MESSAGE);
        assert_eq!(OpenResponse::decode(&long.encode()).unwrap(), long);
    }

    #[test]
    fn retryable_statuses() {
        assert!(Status::NoEndpoints.is_retryable());
        assert!(Status::Draining.is_retryable());
        assert!(Status::Retired.is_retryable());
        assert!(!Status::Forbidden.is_retryable());
        assert!(!Status::Opened.is_retryable());
        assert!(!Status::RateLimited.is_retryable());
        assert_eq!(Status::from_u8(7), Ok(Status::RateLimited));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = OpenRequest::decode(&bytes);
            let _ = OpenResponse::decode(&bytes);
            if bytes.len() >= PREFIX_LEN {
                let p: [u8; PREFIX_LEN] = bytes[..PREFIX_LEN].try_into().unwrap();
                if let Ok(n) = OpenRequest::decode_prefix(&p) {
                    prop_assert!(n <= MAX_BODY);
                }
                let _ = OpenRequest::decode_body(&bytes[PREFIX_LEN..]);
            }
        }

        #[test]
        fn valid_requests_round_trip(
            service in "[a-z]{1,20}/[a-z]{1,20}",
            port in any::<u16>(),
            deadline_ms in any::<u32>(),
            trace in proptest::collection::vec(any::<u8>(), 0..255),
            caller in "[a-z:/.]{0,100}",
            subset in "[a-z0-9]{0,63}",
        ) {
            let req = OpenRequest { service, port, deadline_ms, trace, caller, subset };
            let bytes = req.encode();
            prop_assert!(bytes.len() <= PREFIX_LEN + MAX_BODY);
            prop_assert_eq!(OpenRequest::decode(&bytes).unwrap(), req);
        }

        #[test]
        fn mutated_frames_never_panic(idx in 0usize..64, val in any::<u8>()) {
            let mut bytes = sample().encode();
            let i = idx % bytes.len();
            bytes[i] = val;
            let _ = OpenRequest::decode(&bytes);
        }
    }
}

//! The precomputed answer path: the zone's answers encoded once per catalog
//! revision, so the common query — one question inside the zone, maybe an
//! EDNS0 OPT — is answered by copying bytes: no decoding into owned
//! names, no record cloning, no allocation.
//!
//! Every answer record's owner is a compression pointer to the question
//! (offset 12), so the stored bytes fit any query for the name whatever its
//! case. Anything unusual — another opcode, more than one question, an
//! EDNS version above 0, a name outside the zone, SRV (which carries
//! additional records), an answer larger than the client may take, a zone
//! that is not ready — returns `None`, and the general path answers it.

use std::collections::HashMap;

use hickory_proto::rr::{LowerName, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};

/// The encoded answers of one zone revision.
#[derive(Debug, Clone, Default)]
pub struct WireZone {
    /// The zone apex, lowercase, in wire form.
    origin: Vec<u8>,
    names: HashMap<Box<[u8]>, WireName>,
    /// The SOA record with its owner written out, for negative answers.
    soa_authority: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
struct WireName {
    /// `(type, record count, records)`, records owned by pointer to the
    /// question.
    answers: Vec<(u16, u16, Vec<u8>)>,
}

/// Largest question name in wire form (RFC 1035).
const MAX_NAME: usize = 255;
const TYPE_OPT: u16 = 41;
const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;

fn wire_name(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

/// A record as `owner | type | class | ttl | rdlength | rdata`, names
/// written out (no compression: the bytes are copied into other messages).
fn encode_record(record: &Record) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(64);
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_name_encoding(NameEncoding::Uncompressed);
    record.emit(&mut enc).ok()?;
    Some(buf)
}

impl WireZone {
    /// Encodes `records` (by owner and type), the set of existing `names`
    /// and the apex `soa`.
    pub fn build<'a>(
        origin: &LowerName,
        soa: &Record,
        records: impl Iterator<Item = (&'a LowerName, RecordType, &'a [Record])>,
        names: impl Iterator<Item = &'a LowerName>,
    ) -> Self {
        let origin_name: Name = origin.clone().into();
        let origin = wire_name(&origin_name);
        let mut zone = WireZone {
            soa_authority: encode_record(soa).unwrap_or_default(),
            origin: origin.clone(),
            names: HashMap::new(),
        };
        for n in names {
            let n: Name = n.clone().into();
            zone.names.entry(wire_name(&n).into()).or_default();
        }
        let mut add = |owner: &Name, rtype: RecordType, rrs: &[Record]| {
            let owner_len = wire_name(owner).len();
            let mut bytes = Vec::new();
            for r in rrs {
                let Some(full) = encode_record(r) else {
                    return;
                };
                bytes.extend_from_slice(&[0xc0, 0x0c]);
                bytes.extend_from_slice(&full[owner_len..]);
            }
            zone.names
                .entry(wire_name(owner).into())
                .or_default()
                .answers
                .push((u16::from(rtype), rrs.len() as u16, bytes));
        };
        add(&origin_name, RecordType::SOA, std::slice::from_ref(soa));
        for (owner, rtype, rrs) in records {
            let owner: Name = owner.clone().into();
            add(&owner, rtype, rrs);
        }
        zone
    }

    /// Answers `query` into `out` and returns the reply's length, or `None`
    /// when the general path must answer. `edns_limit` is the server's
    /// largest UDP answer to an EDNS0 query.
    pub fn answer(&self, query: &[u8], out: &mut Vec<u8>, edns_limit: u16) -> Option<usize> {
        let q = parse_query(query)?;
        let mut lower = [0u8; MAX_NAME];
        let name = &mut lower[..q.name.len()];
        name.copy_from_slice(q.name);
        // Lowercase the label bytes (length bytes are below 64, unchanged).
        name.make_ascii_lowercase();
        if q.qtype == TYPE_SRV || !name.ends_with(&self.origin) {
            return None;
        }
        // The apex must sit on a label boundary: walk the labels.
        let mut at = 0;
        while name.len() - at > self.origin.len() {
            at += 1 + name[at] as usize;
        }
        if name.len() - at != self.origin.len() {
            return None;
        }
        let (rcode, count, records, negative) = match self.names.get(&*name) {
            Some(n) => match n.answers.iter().find(|(t, _, _)| *t == q.qtype) {
                Some((_, c, b)) => (0u8, *c, b.as_slice(), false),
                None => (0, 0, &[][..], true),
            },
            None => (3, 0, &[][..], true),
        };
        let limit = match q.edns_size {
            Some(size) => size.clamp(512, edns_limit.max(512)),
            None => 512,
        } as usize;
        out.clear();
        out.extend_from_slice(&query[0..2]);
        // QR, opcode 0, AA; RD copied; RA 0; rcode.
        out.push(0x84 | (query[2] & 0x01));
        out.push(rcode);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&u16::from(negative).to_be_bytes());
        out.extend_from_slice(&u16::from(q.edns_size.is_some()).to_be_bytes());
        out.extend_from_slice(&query[12..q.question_end]);
        out.extend_from_slice(records);
        if negative {
            out.extend_from_slice(&self.soa_authority);
        }
        if q.edns_size.is_some() {
            // OPT: root owner, our payload size, version 0, no flags or
            // options.
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&(limit as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        // Too big: the general path truncates.
        (out.len() <= limit).then_some(out.len())
    }

    /// Names held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the zone has no precomputed answers.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

struct Parsed<'a> {
    /// The question name in wire form, as sent.
    name: &'a [u8],
    qtype: u16,
    /// Where the question ends.
    question_end: usize,
    /// The client's EDNS0 payload size, if it sent an OPT.
    edns_size: Option<u16>,
}

/// Accepts only the plain shape: a query, opcode 0, one question of class
/// IN with an uncompressed name, no answer or authority records, at most
/// one additional record which must be an EDNS version 0 OPT, and nothing
/// after it. Never reads out of bounds.
fn parse_query(p: &[u8]) -> Option<Parsed<'_>> {
    if p.len() < 12 + 5 {
        return None;
    }
    let flags = p[2];
    // QR must be 0 and opcode 0; TC set on a query makes no sense.
    if flags & 0xfa != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut at = 12;
    loop {
        let len = *p.get(at)? as usize;
        if len == 0 {
            at += 1;
            break;
        }
        // Pointers (and the reserved 0x40/0x80 forms) go the general way.
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if at - 12 > MAX_NAME - 1 {
            return None;
        }
    }
    let name = &p[12..at];
    let qtype = u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*p.get(at + 2)?, *p.get(at + 3)?]);
    if qclass != CLASS_IN || qtype == TYPE_OPT {
        return None;
    }
    let question_end = at + 4;
    let mut edns_size = None;
    if ar == 1 {
        // Root owner, type OPT, class = payload size, ext-rcode, version,
        // flags, rdlength, options.
        let opt = p.get(question_end..question_end + 11)?;
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT || opt[6] != 0 {
            return None;
        }
        let rdlen = u16::from_be_bytes([opt[9], opt[10]]) as usize;
        if question_end + 11 + rdlen != p.len() {
            return None;
        }
        edns_size = Some(u16::from_be_bytes([opt[3], opt[4]]));
    } else if question_end != p.len() {
        return None;
    }
    Some(Parsed {
        name,
        qtype,
        question_end,
        edns_size,
    })
}

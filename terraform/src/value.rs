//! Terraform values and their msgpack wire form.
//!
//! Terraform sends configuration, plans and state as msgpack (its
//! `DynamicValue`). Objects and maps are msgpack maps with string keys;
//! lists, sets and tuples are arrays; a value not known until apply is the
//! msgpack extension type 0 (or 12, an unknown with refinements). This
//! provider's schemas use no dynamically typed attribute, so the decoder
//! needs no schema.
//!
//! The decoder is bounded: nesting deeper than [`MAX_DEPTH`] is refused, and
//! no length prefix can make it allocate more than the input holds.

use std::collections::BTreeMap;

/// Deepest nesting the decoder accepts (this provider's schemas nest three
/// levels).
pub const MAX_DEPTH: usize = 32;

/// A Terraform value (msgpack), as the plugin protocol carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// Known only after apply.
    Unknown,
    /// A bool.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(String),
    /// A list, set or tuple.
    List(Vec<Value>),
    /// An object or a map.
    Map(BTreeMap<String, Value>),
}

/// Why msgpack bytes are not a value (each with its byte offset).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The bytes end inside a value.
    #[error("value ends early, at byte {0}")]
    Truncated(usize),
    /// Bytes are left after the value.
    #[error("{0} bytes left over after the value")]
    Trailing(usize),
    /// Nested deeper than the limit.
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A msgpack type (marker) this decoder does not take.
    #[error("unsupported msgpack type 0x{0:02x} at byte {1}")]
    Unsupported(u8, usize),
    /// A map key that is not a string.
    #[error("map key at byte {0} is not a string")]
    KeyNotString(usize),
    /// A string that is not UTF-8.
    #[error("string at byte {0} is not UTF-8")]
    NotUtf8(usize),
}

impl Value {
    /// Whether it is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Whether it is known (no unknown value anywhere inside).
    pub fn is_known(&self) -> bool {
        !matches!(self, Value::Unknown)
    }

    /// Known all the way down.
    pub fn is_wholly_known(&self) -> bool {
        match self {
            Value::Unknown => false,
            Value::List(l) => l.iter().all(Value::is_wholly_known),
            Value::Map(m) => m.values().all(Value::is_wholly_known),
            _ => true,
        }
    }

    /// An attribute of an object (Null when absent or not an object).
    pub fn get(&self, name: &str) -> &Value {
        match self {
            Value::Map(m) => m.get(name).unwrap_or(&Value::Null),
            _ => &Value::Null,
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// A string value.
    pub fn string(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// A string, or Null for an empty one.
    pub fn string_or_null(s: &str) -> Value {
        if s.is_empty() {
            Value::Null
        } else {
            Value::string(s)
        }
    }

    /// A list of strings.
    pub fn string_list<S: AsRef<str>>(items: &[S]) -> Value {
        Value::List(items.iter().map(|s| Value::string(s.as_ref())).collect())
    }

    /// A map of strings.
    pub fn string_map<'a>(items: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
        Value::Map(
            items
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::string(v.as_str())))
                .collect(),
        )
    }

    /// A map of strings, if this is one (Null reads as empty).
    pub fn to_string_map(&self) -> Option<BTreeMap<String, String>> {
        match self {
            Value::Null => Some(BTreeMap::new()),
            Value::Map(m) => m
                .iter()
                .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect(),
            _ => None,
        }
    }

    /// A list of strings, if this is one (Null reads as empty).
    pub fn to_string_list(&self) -> Option<Vec<String>> {
        match self {
            Value::Null => Some(Vec::new()),
            Value::List(l) => l.iter().map(|v| Some(v.as_str()?.to_string())).collect(),
            _ => None,
        }
    }

    /// From JSON (state files hold JSON; Terraform hands old state over as
    /// JSON for upgrading).
    pub fn from_json(j: &serde_json::Value) -> Value {
        match j {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(a) => Value::List(a.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// The value as msgpack.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.push(0xc0),
            // Extension type 0, one zero byte: Terraform's "unknown".
            Value::Unknown => out.extend_from_slice(&[0xd4, 0x00, 0x00]),
            Value::Bool(false) => out.push(0xc2),
            Value::Bool(true) => out.push(0xc3),
            Value::Number(n) => encode_number(*n, out),
            Value::String(s) => {
                let n = s.len();
                if n < 32 {
                    out.push(0xa0 | n as u8);
                } else if n <= u8::MAX as usize {
                    out.extend_from_slice(&[0xd9, n as u8]);
                } else if n <= u16::MAX as usize {
                    out.push(0xda);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdb);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                out.extend_from_slice(s.as_bytes());
            }
            Value::List(items) => {
                let n = items.len();
                if n < 16 {
                    out.push(0x90 | n as u8);
                } else if n <= u16::MAX as usize {
                    out.push(0xdc);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdd);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                for v in items {
                    v.encode_into(out);
                }
            }
            Value::Map(m) => {
                let n = m.len();
                if n < 16 {
                    out.push(0x80 | n as u8);
                } else if n <= u16::MAX as usize {
                    out.push(0xde);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdf);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                for (k, v) in m {
                    Value::String(k.clone()).encode_into(out);
                    v.encode_into(out);
                }
            }
        }
    }

    /// A value from msgpack; bounded in depth and size.
    pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
        let mut d = Decoder { bytes, pos: 0 };
        let v = d.value(0)?;
        if d.pos != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - d.pos));
        }
        Ok(v)
    }
}

fn encode_number(n: f64, out: &mut Vec<u8>) {
    // Whole numbers go as integers, as Terraform itself sends them.
    if n.fract() == 0.0 && n >= i64::MIN as f64 && n < i64::MAX as f64 {
        let i = n as i64;
        if (0..128).contains(&i) {
            out.push(i as u8);
        } else if (-32..0).contains(&i) {
            out.push(i as i8 as u8);
        } else {
            out.push(0xd3);
            out.extend_from_slice(&i.to_be_bytes());
        }
    } else {
        out.push(0xcb);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Decoder<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.bytes.len() - self.pos < n {
            return Err(DecodeError::Truncated(self.pos));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// A count of items, each at least one byte: more than the bytes left
    /// is a truncated value, refused before anything is allocated.
    fn count(&mut self, n: u64) -> Result<usize, DecodeError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(DecodeError::Truncated(self.pos));
        }
        Ok(n as usize)
    }

    fn str(&mut self, len: u64) -> Result<String, DecodeError> {
        let at = self.pos;
        let len = self.count(len)?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::NotUtf8(at))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let at = self.pos;
        let tag = self.take(1)?[0];
        let v = match tag {
            0x00..=0x7f => Value::Number(f64::from(tag)),
            0xe0..=0xff => Value::Number(f64::from(tag as i8)),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xcc => Value::Number(self.uint(1)? as f64),
            0xcd => Value::Number(self.uint(2)? as f64),
            0xce => Value::Number(self.uint(4)? as f64),
            0xcf => Value::Number(self.uint(8)? as f64),
            0xd0 => Value::Number(f64::from(self.uint(1)? as u8 as i8)),
            0xd1 => Value::Number(f64::from(self.uint(2)? as u16 as i16)),
            0xd2 => Value::Number(f64::from(self.uint(4)? as u32 as i32)),
            0xd3 => Value::Number(self.uint(8)? as i64 as f64),
            0xca => Value::Number(f64::from(f32::from_bits(self.uint(4)? as u32))),
            0xcb => Value::Number(f64::from_bits(self.uint(8)?)),
            0xa0..=0xbf => Value::String(self.str(u64::from(tag & 0x1f))?),
            0xd9 => {
                let n = self.uint(1)?;
                Value::String(self.str(n)?)
            }
            0xda => {
                let n = self.uint(2)?;
                Value::String(self.str(n)?)
            }
            0xdb => {
                let n = self.uint(4)?;
                Value::String(self.str(n)?)
            }
            0x90..=0x9f => self.list(u64::from(tag & 0x0f), depth)?,
            0xdc => {
                let n = self.uint(2)?;
                self.list(n, depth)?
            }
            0xdd => {
                let n = self.uint(4)?;
                self.list(n, depth)?
            }
            0x80..=0x8f => self.map(u64::from(tag & 0x0f), depth)?,
            0xde => {
                let n = self.uint(2)?;
                self.map(n, depth)?
            }
            0xdf => {
                let n = self.uint(4)?;
                self.map(n, depth)?
            }
            // Extensions: fixext 1/2/4/8/16 and ext 8/16/32. Types 0 and 12
            // are Terraform's unknown values; others are not ours to read.
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                let len = match tag {
                    0xd4 => 1,
                    0xd5 => 2,
                    0xd6 => 4,
                    0xd7 => 8,
                    0xd8 => 16,
                    0xc7 => self.uint(1)?,
                    0xc8 => self.uint(2)?,
                    _ => self.uint(4)?,
                };
                let ty = self.take(1)?[0];
                let len = self.count(len)?;
                self.take(len)?;
                if ty != 0 && ty != 12 {
                    return Err(DecodeError::Unsupported(tag, at));
                }
                Value::Unknown
            }
            _ => return Err(DecodeError::Unsupported(tag, at)),
        };
        Ok(v)
    }

    fn list(&mut self, n: u64, depth: usize) -> Result<Value, DecodeError> {
        let n = self.count(n)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::List(items))
    }

    fn map(&mut self, n: u64, depth: usize) -> Result<Value, DecodeError> {
        let n = self.count(n)?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let at = self.pos;
            let Value::String(k) = self.value(depth + 1)? else {
                return Err(DecodeError::KeyNotString(at));
            };
            let v = self.value(depth + 1)?;
            m.insert(k, v);
        }
        Ok(Value::Map(m))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any value (for property tests here and in the provider).
    pub(crate) fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            Just(Value::Unknown),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Number(i as f64)),
            (-1e12f64..1e12).prop_map(Value::Number),
            ".{0,300}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 20, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..20).prop_map(Value::List),
                prop::collection::btree_map(".{0,40}", inner, 0..20).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_value_survives_the_round_trip(v in value()) {
            prop_assert_eq!(Value::decode(&v.encode()), Ok(v));
        }

        #[test]
        fn arbitrary_bytes_decode_or_fail_without_panicking(
            bytes in prop::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = Value::decode(&bytes);
        }

        #[test]
        fn a_cut_value_is_refused(v in value(), cut in 0usize..1000) {
            let bytes = v.encode();
            let cut = cut % bytes.len();
            prop_assert!(Value::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn what_terraform_sends_for_an_object_with_an_unknown_decodes() {
        // {"name": "east", "token": <unknown>, "ttl": 300}
        let mut bytes = vec![0x83, 0xa4];
        bytes.extend_from_slice(b"name");
        bytes.push(0xa4);
        bytes.extend_from_slice(b"east");
        bytes.push(0xa5);
        bytes.extend_from_slice(b"token");
        bytes.extend_from_slice(&[0xd4, 0x00, 0x00]);
        bytes.push(0xa3);
        bytes.extend_from_slice(b"ttl");
        bytes.extend_from_slice(&[0xcd, 0x01, 0x2c]);
        let v = Value::decode(&bytes).unwrap();
        assert_eq!(v.get("name").as_str(), Some("east"));
        assert_eq!(v.get("token"), &Value::Unknown);
        assert_eq!(v.get("ttl").as_f64(), Some(300.0));
        assert!(!v.is_wholly_known());
    }

    #[test]
    fn a_length_prefix_larger_than_the_input_allocates_nothing() {
        // An array claiming 2^32-1 items, a string claiming 4 GiB.
        assert_eq!(
            Value::decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated(5))
        );
        assert_eq!(
            Value::decode(&[0xdb, 0xff, 0xff, 0xff, 0xff, b'a']),
            Err(DecodeError::Truncated(5))
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut bytes = vec![0x91; MAX_DEPTH + 2];
        bytes.push(0xc0);
        assert_eq!(Value::decode(&bytes), Err(DecodeError::TooDeep));
        let mut ok = vec![0x91; MAX_DEPTH];
        ok.push(0xc0);
        assert!(Value::decode(&ok).is_ok());
    }
}

//! The Terraform plugin protocol's msgpack values, as the provider reads
//! them from Terraform: bounded, never a panic, and what decodes encodes
//! back to a value that decodes the same.
#![no_main]
use causeway_terraform::value::Value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Value::decode(data) {
        let bytes = v.encode();
        let again = Value::decode(&bytes).expect("an encoded value decodes");
        assert_eq!(again.encode(), bytes);
    }
});

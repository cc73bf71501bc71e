//! A join token, as the controller reads it from an anonymous caller.
#![no_main]
use causeway_api::token::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = JoinToken::decode(s) {
            assert_eq!(JoinToken::decode(&t.encode()).ok(), Some(t));
        }
    }
});

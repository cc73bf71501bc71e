//! The tunnel stream header, as an exporting gateway reads it from a peer
//! (and the answer, as the caller reads it): never a panic, and what
//! decodes encodes back to the same frame.
#![no_main]
use causeway_gateway_core::header::{OpenRequest, OpenResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = OpenRequest::decode(data) {
        let again = OpenRequest::decode(&req.encode()).expect("an encoded request decodes");
        assert_eq!(again, req);
    }
    if let Ok(resp) = OpenResponse::decode(data) {
        let again = OpenResponse::decode(&resp.encode()).expect("an encoded response decodes");
        assert_eq!(again, resp);
    }
});

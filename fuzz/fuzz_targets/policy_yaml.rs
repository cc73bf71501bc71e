//! Policy documents (YAML or JSON, several per text), as `ctl policy
//! apply`, the Terraform provider and the controller read them.
#![no_main]
use causeway_api::policy::{parse_document, read_documents};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(docs) = read_documents(text) {
        for d in docs {
            if let Ok(v) = serde_json::from_str(&d) {
                if let Ok(p) = parse_document(&v) {
                    // The canonical form reads back as the same policy.
                    let again: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
                    assert_eq!(parse_document(&again).ok().map(|q| q.to_json()), Some(p.to_json()));
                }
            }
        }
    }
});

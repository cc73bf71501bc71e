//! Gateway and controller configuration files: any text gets a list of
//! errors naming fields, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = causeway_gateway::config::GatewayConfig::from_toml(text) {
        let _ = cfg.validate();
    }
    if let Ok(cfg) = causeway_federation::config::ControllerConfig::from_toml("fuzz.toml", text) {
        let _ = cfg.validate();
    }
});

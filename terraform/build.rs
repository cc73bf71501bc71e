//! Compiles the plugin protocol with protox (pure Rust): no `protoc` needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tfplugin6.proto");
    println!("cargo:rerun-if-changed=proto/plugin.proto");
    let fds = protox::compile(["proto/tfplugin6.proto", "proto/plugin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

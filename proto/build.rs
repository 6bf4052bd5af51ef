//! Compiles `proto/lightrnn.proto` with protox (no system `protoc`) and generates the
//! tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/lightrnn.proto");
    let fds = protox::compile(["lightrnn.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The join reply carries the generation's secrets: its Debug (src/redact.rs)
        // leaves them out.
        .skip_debug([".lightrnn.v1.JoinReply"])
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles `proto/roomcast.proto` with the pure-Rust `protox` compiler, so
//! building roomcast never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/roomcast.proto");
    let descriptors = protox::compile(["proto/roomcast.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}

//! Compiles `proto/kvshare/v1/*.proto` with protox (pure Rust; no system protoc needed) and
//! generates prost messages (bytes fields as `bytes::Bytes`) and tonic client/server stubs.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a build-script binary may be shared by several
    // checkouts through one target directory, and must compile the proto of the checkout
    // being built.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = proto_root.join("kvshare/v1/kvshare.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let fds = protox::compile([&file], [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kvshare_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}

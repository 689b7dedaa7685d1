//! Compiles Hubble's protos (../proto, see its README) into Rust with protox and
//! tonic-prost-build: no protoc needed.
//!
//! Builds the eBPF programs (microseg-ebpf) for the bpfel target with the nightly
//! toolchain and bpf-linker; the object is embedded with `include_bytes_aligned!`.
//! `AYA_BUILD_SKIP=1` skips this for userspace-only checks (an empty object is
//! embedded, and loading it fails clearly).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    compile_hubble_protos()?;
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("microseg-agent has no parent directory"))?
        .join("microseg-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={root_dir}/src");
    println!("cargo:rerun-if-changed={root_dir}/build.rs");
    println!("cargo:rerun-if-changed=../microseg-common/src");
    let skipped = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skipped {
        let out = PathBuf::from(std::env::var("OUT_DIR")?).join("microseg");
        if !out.exists() {
            std::fs::write(out, [])?;
        }
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "microseg-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// The Observer service (server for the agent, client for tests and tools) and its
/// messages, from the subset of Hubble's protos in ../proto.
fn compile_hubble_protos() -> anyhow::Result<()> {
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let descriptors = protox::compile(
        [
            "flow/flow.proto",
            "relay/relay.proto",
            "observer/observer.proto",
        ],
        [&proto_dir],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Linker options for the programs (bpf-linker).

fn main() {
    // bpf-linker passes LLVM `--bpf-expand-memcpy-in-order` unless told not to: that
    // sets the BPF backend's store limits for memory intrinsics to zero, so every
    // memset and memmove (a zeroed key's padding, a copied 16-byte address) becomes a
    // BPF-to-BPF call to a `memset`/`memmove` function, each a stack frame of its own
    // (32 bytes before Linux 6.9) and a call on the hot path. Without it they are
    // expanded into plain loads and stores.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}

//! The verifier's stack budget, measured from the eBPF object this build embeds: each
//! program's deepest chain of BPF-to-BPF calls must leave at least 64 of the 512
//! bytes when frames are rounded to 32 bytes, as kernels before 6.9 do (TCX, which
//! the TC hooks need, came in 6.6). No kernel is needed: this reads instructions.

use microseg_tests::bpf_stack::{MAX_BPF_STACK, Rounding, StackReport};

/// What the deepest chain must leave free at the older rounding.
const MARGIN: u32 = 64;

#[test]
fn every_programs_deepest_call_chain_leaves_64_bytes_at_the_older_rounding() {
    let object = microseg::datapath::program_object();
    assert!(
        !object.is_empty(),
        "the eBPF object was not built (AYA_BUILD_SKIP=1?)"
    );
    let report = StackReport::from_object(object).expect("reading the eBPF object");
    let mut names: Vec<&str> = report
        .programs
        .iter()
        .map(|&p| report.functions[p].name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            microseg_common::maps::PROG_TC_EGRESS,
            microseg_common::maps::PROG_TC_EGRESS_L3,
            microseg_common::maps::PROG_TC_HOLD_EGRESS,
            microseg_common::maps::PROG_TC_HOLD_INGRESS,
            microseg_common::maps::PROG_TC_INGRESS,
            microseg_common::maps::PROG_TC_INGRESS_L3,
            microseg_common::maps::PROG_XDP,
            microseg_common::maps::PROG_XDP_HOLD,
        ],
        "the programs of the object"
    );
    println!("function frames (bytes below r10, 8-byte slots):");
    for function in &report.functions {
        println!(
            "  {:>4}  {} ({})",
            function.frame, function.name, function.section
        );
    }
    let mut failures = Vec::new();
    for &program in &report.programs {
        let name = &report.functions[program].name;
        let current = report
            .deepest_chain(program, Rounding::Jit16)
            .expect("call graph");
        let older = report
            .deepest_chain(program, Rounding::Legacy32)
            .expect("call graph");
        // The deciding programs call out of line; the held ones may be one frame.
        let holds = [
            microseg_common::maps::PROG_TC_HOLD_EGRESS,
            microseg_common::maps::PROG_TC_HOLD_INGRESS,
            microseg_common::maps::PROG_XDP_HOLD,
        ];
        assert!(
            older.frames.len() > 1 || holds.contains(&name.as_str()),
            "{name}: no BPF-to-BPF call found; the object is not read right"
        );
        let chain: Vec<String> = older
            .frames
            .iter()
            .map(|(f, bytes)| format!("{} {bytes}", short_name(f)))
            .collect();
        println!(
            "{name}: deepest chain {} of {MAX_BPF_STACK} bytes (6.9+, JIT: 16-byte frames), {} (before 6.9: 32-byte frames): {}",
            current.bytes,
            older.bytes,
            chain.join(" -> ")
        );
        if older.bytes + MARGIN > MAX_BPF_STACK {
            failures.push(format!(
                "{name}: {} bytes at 32-byte rounding leaves {} of {MAX_BPF_STACK} (needs {MARGIN})",
                older.bytes,
                MAX_BPF_STACK.saturating_sub(older.bytes)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `parse_ipv6` from a mangled Rust name such as `_RNvNtCs..._8microseg5parse10parse_ipv6`.
fn short_name(symbol: &str) -> String {
    let Some(rest) = symbol.strip_prefix("_R") else {
        return symbol.to_owned();
    };
    // The last length-prefixed identifier of a v0 mangled path.
    let bytes = rest.as_bytes();
    let mut last = symbol.to_owned();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let len: usize = rest[start..i].parse().unwrap_or(0);
            if let Some(ident) = rest.get(i..i + len) {
                last = ident.to_owned();
            }
            i += len;
        } else {
            i += 1;
        }
    }
    last
}

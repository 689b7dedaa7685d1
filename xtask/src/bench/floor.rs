//! The floors that microseg's figures stand on, measured in the same run:
//! - a trivial program (`r0 = XDP_PASS; exit`, and `r0 = TC_ACT_UNSPEC; exit` for TC)
//!   through BPF_PROG_TEST_RUN: the cost of the test-run harness itself, both hot
//!   (one call, many repeats) and per call (repeat = 1, as the spread figures use);
//! - the memory floor at a scale: one lookup of a random key in a hash map of that
//!   many entries (BENCH-NOTES: a verdict that costs about two of those is near the
//!   limit).
//!
//! The programs are a handful of raw instructions loaded with the bpf() syscall, so
//! the floor needs no second eBPF object and no change to microseg-ebpf.

use std::{
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

const XDP_PASS: i32 = 2;
const TC_ACT_UNSPEC: i32 = -1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_PRANDOM_U32: i32 = 7;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `rD = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// `rD = rS` (BPF_ALU64 | BPF_MOV | BPF_X).
const fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// `rD += imm` (BPF_ALU64 | BPF_ADD | BPF_K).
const fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
/// `wD %= imm` (BPF_ALU | BPF_MOD | BPF_K): 32-bit unsigned modulo.
const fn mod32_imm(dst: u8, imm: i32) -> Insn {
    insn(0x94, dst, 0, 0, imm)
}
/// `*(u32 *)(rD + off) = rS` (BPF_STX | BPF_MEM | BPF_W).
const fn store32(dst: u8, off: i16, src: u8) -> Insn {
    insn(0x63, dst, src, off, 0)
}
/// `call helper`.
const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `rD = map_by_fd(fd)`: the two-slot BPF_LD | BPF_IMM | BPF_DW with BPF_PSEUDO_MAP_FD.
const fn load_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_MAP_CREATE, up to `map_flags`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// bpf(cmd, attr): the result (an fd or 0) or the OS error.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed `repr(C)` prefix of `union
    // bpf_attr` for `cmd`, and its size is passed with it; the kernel reads at most
    // that many bytes and writes only output fields inside them. Pointers stored in
    // it (instructions, license, packet data) are valid for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd_from(ret: libc::c_long) -> OwnedFd {
    // SAFETY: a successful BPF_PROG_LOAD / BPF_MAP_CREATE returns a new file
    // descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

/// Program type of a floor program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Xdp,
    Tc,
}

/// A program loaded with raw instructions.
pub struct RawProgram {
    fd: OwnedFd,
}

impl RawProgram {
    fn load(kind: Kind, insns: &[Insn], name: &str) -> anyhow::Result<Self> {
        let license = CString::new("GPL").expect("no NUL");
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = ProgLoadAttr {
            prog_type: match kind {
                Kind::Xdp => BPF_PROG_TYPE_XDP,
                Kind::Tc => BPF_PROG_TYPE_SCHED_CLS,
            },
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        for (slot, byte) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *slot = byte;
        }
        match bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(ret) => Ok(Self { fd: fd_from(ret) }),
            Err(error) => {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                bail!(
                    "loading the floor program {name} failed: {error}; verifier log: {}",
                    String::from_utf8_lossy(&log[..end])
                )
            }
        }
    }

    /// `r0 = XDP_PASS` (or `TC_ACT_UNSPEC`); exit.
    pub fn trivial(kind: Kind) -> anyhow::Result<Self> {
        let verdict = match kind {
            Kind::Xdp => XDP_PASS,
            Kind::Tc => TC_ACT_UNSPEC,
        };
        Self::load(kind, &[mov_imm(0, verdict), exit()], "msb_trivial")
    }

    /// One lookup of `bpf_get_prandom_u32() % entries` in `map`, then XDP_PASS.
    fn random_lookup(map: &HashMapU32, entries: u32) -> anyhow::Result<Self> {
        let [ld0, ld1] = load_map_fd(1, map.fd.as_raw_fd());
        let insns = [
            call(HELPER_GET_PRANDOM_U32),
            mod32_imm(0, entries.max(1) as i32),
            store32(10, -4, 0),
            mov_reg(2, 10),
            add_imm(2, -4),
            ld0,
            ld1,
            call(HELPER_MAP_LOOKUP_ELEM),
            mov_imm(0, XDP_PASS),
            exit(),
        ];
        Self::load(Kind::Xdp, &insns, "msb_memfloor")
    }

    /// A program that only draws the random key (the lookup's own baseline).
    fn random_only() -> anyhow::Result<Self> {
        let insns = [
            call(HELPER_GET_PRANDOM_U32),
            mod32_imm(0, 1000),
            store32(10, -4, 0),
            mov_imm(0, XDP_PASS),
            exit(),
        ];
        Self::load(Kind::Xdp, &insns, "msb_rndfloor")
    }

    /// BPF_PROG_TEST_RUN: (return value, mean ns per run as the kernel measured it).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u32)> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: repeat.max(1),
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of a floor program")?;
        Ok((attr.retval, attr.duration))
    }
}

/// A BPF hash map with u32 keys and values.
struct HashMapU32 {
    fd: OwnedFd,
}

impl HashMapU32 {
    fn create(entries: u32) -> anyhow::Result<Self> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 4,
            value_size: 4,
            max_entries: entries.max(1),
            map_flags: 0,
        };
        let ret = bpf(BPF_MAP_CREATE, &mut attr).context("creating the memory-floor map")?;
        Ok(Self { fd: fd_from(ret) })
    }

    fn insert(&self, key: u32, value: u32) -> anyhow::Result<()> {
        let mut attr = MapUpdateAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            ..MapUpdateAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).context("filling the memory-floor map")?;
        Ok(())
    }
}

/// The harness floor of one program type.
#[derive(Clone, Copy, Debug, Default)]
pub struct HarnessFloor {
    /// One call with many repeats: ns per run.
    pub hot_ns: f64,
    /// Many calls with repeat = 1: mean kernel-measured ns per call.
    pub per_call_ns: f64,
}

/// A minimal Ethernet + IPv4 frame; the trivial programs do not read it.
pub fn floor_frame() -> Vec<u8> {
    let mut frame = vec![0u8; 60];
    frame[12] = 0x08;
    frame
}

/// Measures the trivial program of `kind`: hot with `repeat`, and per call over
/// `calls` calls of repeat = 1 (median of `rounds` means, to shrug off a stray
/// interrupt).
pub fn harness_floor(
    kind: Kind,
    repeat: u32,
    calls: usize,
    rounds: usize,
) -> anyhow::Result<HarnessFloor> {
    let program = RawProgram::trivial(kind)?;
    let frame = floor_frame();
    let expected = match kind {
        Kind::Xdp => XDP_PASS as u32,
        Kind::Tc => TC_ACT_UNSPEC as u32,
    };
    let mut hot = Vec::new();
    let mut per_call = Vec::new();
    for _ in 0..rounds.max(1) {
        let (ret, ns) = program.test_run(&frame, repeat)?;
        if ret != expected {
            bail!("the trivial {kind:?} program returned {ret}, expected {expected}");
        }
        hot.push(f64::from(ns));
        let mut samples = Vec::with_capacity(calls.max(1));
        for _ in 0..calls.max(1) {
            samples.push(f64::from(program.test_run(&frame, 1)?.1));
        }
        per_call.push(trimmed_mean(&mut samples));
    }
    Ok(HarnessFloor {
        hot_ns: median(&mut hot),
        per_call_ns: median(&mut per_call),
    })
}

/// One random lookup in a hash map of `entries` u32 keys, and the random draw alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryFloor {
    pub entries: u32,
    /// Random key + one hash lookup, ns per run.
    pub lookup_ns: f64,
    /// Random key only, ns per run.
    pub random_only_ns: f64,
}

pub fn memory_floor(entries: u32, repeat: u32) -> anyhow::Result<MemoryFloor> {
    let map = HashMapU32::create(entries)?;
    for key in 0..entries {
        map.insert(key, key)?;
    }
    let lookup = RawProgram::random_lookup(&map, entries)?;
    let random = RawProgram::random_only()?;
    let frame = floor_frame();
    let mut lookups = Vec::new();
    let mut randoms = Vec::new();
    for _ in 0..3 {
        lookups.push(f64::from(lookup.test_run(&frame, repeat)?.1));
        randoms.push(f64::from(random.test_run(&frame, repeat)?.1));
    }
    Ok(MemoryFloor {
        entries,
        lookup_ns: median(&mut lookups),
        random_only_ns: median(&mut randoms),
    })
}

/// Mean of the lowest 99% of `values`: a call interrupted by the host (hundreds of
/// times the usual duration) would otherwise weigh on the mean of thousands.
pub fn trimmed_mean(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let keep = (values.len() * 99).div_ceil(100).max(1);
    values[..keep].iter().sum::<f64>() / keep as f64
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

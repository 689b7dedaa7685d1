//! Another program on a TCX hook, as a CNI add-on or a monitoring tool would attach
//! one beside microseg: it counts the packets it sees and returns `TCX_PASS`
//! (`TC_ACT_OK`), which ends the hook's chain. Run before microseg's program, it
//! would let every packet through unjudged; run after it, it sees exactly what
//! microseg allowed (microseg returns `TCX_NEXT` for those).
//!
//! Built from raw instructions and raw `bpf(2)` calls, so that the tests need no
//! second eBPF build.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::netns::NetNs;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_PROG_LOAD: i64 = 5;
const BPF_LINK_CREATE: i64 = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// With no relative program: before every other program of the hook.
const BPF_F_BEFORE: u32 = 8;
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Instruction {
    code: u8,
    /// dst in the low nibble, src in the high one.
    registers: u8,
    offset: i16,
    immediate: i32,
}

const fn insn(code: u8, dst: u8, src: u8, offset: i16, immediate: i32) -> Instruction {
    Instruction {
        code,
        registers: dst | (src << 4),
        offset,
        immediate,
    }
}

/// A pass-everything program attached to one TCX hook, and its packet count.
pub struct ForeignTcx {
    _link: OwnedFd,
    _program: OwnedFd,
    counter: OwnedFd,
}

impl ForeignTcx {
    /// Attaches it first on `interface`'s TC ingress (or egress) hook, in `ns`.
    pub fn attach_first(ns: &NetNs, interface: &str, ingress: bool) -> Self {
        let interface = interface.to_owned();
        ns.run_in(move || {
            let counter = create_counter();
            let program = load_program(&counter);
            let ifindex = ifindex(&interface);
            let link = attach(&program, ifindex, ingress);
            Self {
                _link: link,
                _program: program,
                counter,
            }
        })
    }

    /// Packets the program has seen.
    pub fn packets(&self) -> u64 {
        let key: u32 = 0;
        let mut value: u64 = 0;
        let mut attr = [0u64; 4];
        attr[0] = self.counter.as_raw_fd() as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &mut value as *mut u64 as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).expect("reading the foreign program's counter");
        value
    }
}

fn bpf<T>(command: i64, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed, laid out as the
    // kernel's `union bpf_attr` member for `command`; pointers in it point at live
    // locals of the caller.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` is a new file descriptor the kernel just returned to this
    // process; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A one-element array of one u64.
fn create_counter() -> OwnedFd {
    let mut attr = [0u32; 8];
    attr[0] = BPF_MAP_TYPE_ARRAY;
    attr[1] = 4; // key size
    attr[2] = 8; // value size
    attr[3] = 1; // entries
    owned(bpf(BPF_MAP_CREATE, &mut attr).expect("creating the foreign program's map"))
}

/// `counter[0] += 1; return TCX_PASS;`
fn load_program(counter: &OwnedFd) -> OwnedFd {
    let map = counter.as_raw_fd();
    let program = [
        // *(u32 *)(r10 - 4) = 0
        insn(0x62, 10, 0, -4, 0),
        // r1 = the map (ld_imm64, two slots)
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
        // r2 = r10; r2 += -4
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -4),
        // r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x85, 0, 0, 0, 1),
        // if r0 == 0 goto +2
        insn(0x15, 0, 0, 2, 0),
        // r1 = 1; lock *(u64 *)(r0 + 0) += r1
        insn(0xb7, 1, 0, 0, 1),
        insn(0xdb, 0, 1, 0, 0),
        // r0 = TCX_PASS; exit
        insn(0xb7, 0, 0, 0, 0),
        insn(0x95, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    #[repr(C)]
    struct ProgLoad {
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
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"foreign_pass");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd),
        Err(error) => panic!(
            "loading the foreign program: {error}\n{}",
            String::from_utf8_lossy(&log).trim_end_matches('\0')
        ),
    }
}

fn ifindex(interface: &str) -> u32 {
    let name = std::ffi::CString::new(interface).expect("interface name");
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index != 0, "interface {interface} does not exist");
    index
}

fn attach(program: &OwnedFd, ifindex: u32, ingress: bool) -> OwnedFd {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
    }
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: if ingress {
            BPF_TCX_INGRESS
        } else {
            BPF_TCX_EGRESS
        },
        flags: BPF_F_BEFORE,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    owned(bpf(BPF_LINK_CREATE, &mut attr).expect("attaching the foreign program first"))
}

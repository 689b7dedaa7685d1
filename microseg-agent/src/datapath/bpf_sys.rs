//! The few bpf(2) commands aya 0.14 does not expose: opening a pinned object, reading
//! a link's attachment, and creating and updating a map-in-map (for a real grace
//! period, see `grace`). Attribute blocks are this file's own `#[repr(C)]` prefixes
//! of the kernel's `union bpf_attr`; the kernel zero-fills what a shorter block omits.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// Runs one bpf(2) command with `attr`; returns the syscall's non-negative result.
fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed, `#[repr(C)]` attribute block of
    // `size_of::<T>()` bytes laid out as the kernel's `union bpf_attr` prefix for
    // `command`; any pointers inside it point to memory that outlives the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Wraps a file descriptor the kernel just returned.
fn owned_fd(raw: libc::c_long) -> io::Result<OwnedFd> {
    let raw = i32::try_from(raw).map_err(|_| io::Error::other("file descriptor out of range"))?;
    // SAFETY: `raw` is a new file descriptor returned by bpf(2) and owned by no one
    // else; the OwnedFd closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Creates a map with 4-byte keys and values (`inner_map_fd`: the template of a
/// map-in-map's inner maps).
pub fn create_map(
    map_type: u32,
    max_entries: u32,
    inner_map_fd: Option<&OwnedFd>,
    name: &str,
) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size: 4,
        max_entries,
        inner_map_fd: inner_map_fd.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..Default::default()
    };
    let bytes = name.as_bytes();
    let len = bytes.len().min(attr.map_name.len() - 1);
    attr.map_name[..len].copy_from_slice(&bytes[..len]);
    owned_fd(bpf(BPF_MAP_CREATE, &mut attr)?)
}

#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Sets `map[key] = value` (4-byte key and value).
pub fn update_u32(map: &OwnedFd, key: u32, value: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut attr = MapUpdateAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned object (map, program or link).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("pin path contains a NUL byte"))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    owned_fd(bpf(BPF_OBJ_GET, &mut attr)?)
}

#[repr(C)]
struct GetInfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info`: type, id, prog_id, then a union (8-byte aligned) whose XDP
/// and TCX members start with the ifindex. The buffer is larger than any member.
#[repr(C, align(8))]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    program_id: u32,
    _pad: u32,
    union: [u32; 32],
}

/// Where a link is attached, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkAttachment {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    pub program_id: u32,
    /// The device of an XDP or TCX link; 0 once the device is gone (the kernel
    /// detaches the link then) or for other link types.
    pub ifindex: u32,
}

pub fn link_attachment(link: &OwnedFd) -> io::Result<LinkAttachment> {
    use std::os::fd::AsRawFd;
    let mut info = RawLinkInfo {
        link_type: 0,
        id: 0,
        program_id: 0,
        _pad: 0,
        union: [0; 32],
    };
    let mut attr = GetInfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawLinkInfo>() as u32,
        info: &mut info as *mut RawLinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let ifindex = match info.link_type {
        BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX => info.union[0],
        _ => 0,
    };
    Ok(LinkAttachment {
        link_type: info.link_type,
        program_id: info.program_id,
        ifindex,
    })
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `struct bpf_prog_info` up to its tag: type, id, then the 8-byte tag (a hash of
/// the instructions). The buffer is larger than the kernel needs to fill.
#[repr(C, align(8))]
struct RawProgramInfo {
    program_type: u32,
    id: u32,
    tag: [u8; 8],
    rest: [u64; 32],
}

/// The tag (instruction hash) of the loaded program with this id: two loads of the
/// same program have the same tag.
pub fn program_tag(program_id: u32) -> io::Result<[u8; 8]> {
    use std::os::fd::AsRawFd;
    let mut attr = GetFdByIdAttr {
        id: program_id,
        next_id: 0,
        open_flags: 0,
    };
    let program = owned_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?;
    let mut info = RawProgramInfo {
        program_type: 0,
        id: 0,
        tag: [0; 8],
        rest: [0; 32],
    };
    let mut attr = GetInfoAttr {
        bpf_fd: program.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawProgramInfo>() as u32,
        info: &mut info as *mut RawProgramInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.tag)
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_program_fd: u32,
    flags: u32,
    old_program_fd: u32,
}

/// Atomically replaces the program of the link pinned at `pin` (XDP and TCX links):
/// no packet goes unjudged meanwhile.
pub fn replace_link_program(
    pin: &Path,
    new_program: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let link = open_pinned(pin)?;
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_program_fd: new_program.as_raw_fd() as u32,
        flags: 0,
        old_program_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// `struct bpf_map_info` up to its name: what a pinned map was created as. The
/// buffer is larger than the kernel needs to fill.
#[repr(C, align(8))]
struct RawMapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
    rest: [u64; 16],
}

/// A map's definition as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub fn map_layout(map: std::os::fd::BorrowedFd<'_>) -> io::Result<MapLayout> {
    use std::os::fd::AsRawFd;
    let mut info = RawMapInfo {
        map_type: 0,
        id: 0,
        key_size: 0,
        value_size: 0,
        max_entries: 0,
        map_flags: 0,
        name: [0; 16],
        rest: [0; 16],
    };
    let mut attr = GetInfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawMapInfo>() as u32,
        info: &mut info as *mut RawMapInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(MapLayout {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
    })
}

/// The kernel's name of a map type, for messages.
pub fn map_type_name(map_type: u32) -> String {
    match map_type {
        1 => "hash".to_owned(),
        2 => "array".to_owned(),
        5 => "percpu_hash".to_owned(),
        6 => "percpu_array".to_owned(),
        9 => "lru_hash".to_owned(),
        10 => "lru_percpu_hash".to_owned(),
        11 => "lpm_trie".to_owned(),
        12 => "array_of_maps".to_owned(),
        27 => "ringbuf".to_owned(),
        other => format!("type {other}"),
    }
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements fetched per BPF_MAP_LOOKUP_BATCH call.
const BATCH_ELEMENTS: usize = 8192;

/// Counts a hash map's entries with BPF_MAP_LOOKUP_BATCH (Linux 5.6+): one syscall
/// per `BATCH_ELEMENTS` entries rather than two per entry, so a full table of a
/// million flows is counted in about 120 calls. The count is a snapshot of a map
/// the programs keep changing, as any walk is.
pub fn count_entries(
    map: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<u64> {
    let mut total = 0u64;
    for_each_entry(map, key_size, value_size, |_, _| total += 1)?;
    Ok(total)
}

/// Calls `each` with every (key, value) of a hash map, read with
/// BPF_MAP_LOOKUP_BATCH (see [`count_entries`]): a snapshot of a map the programs
/// keep changing.
pub fn for_each_entry(
    map: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut keys = vec![0u8; key_size * BATCH_ELEMENTS];
    let mut values = vec![0u8; value_size * BATCH_ELEMENTS];
    // Hash maps' batch token is a bucket index (4 bytes); room for any key anyway.
    let mut in_token = vec![0u8; key_size.max(8)];
    let mut out_token = vec![0u8; key_size.max(8)];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                in_token.as_mut_ptr() as u64
            },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ELEMENTS as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // The kernel reports what it copied even when it says the walk is done.
        for index in 0..attr.count as usize {
            each(
                &keys[index * key_size..(index + 1) * key_size],
                &values[index * value_size..(index + 1) * value_size],
            );
        }
        match result {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        std::mem::swap(&mut in_token, &mut out_token);
        first = false;
    }
}

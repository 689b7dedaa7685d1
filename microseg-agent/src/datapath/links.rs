//! What the kernel says about interfaces and the links attached to them: an
//! interface's index and kind of link layer, and whether a pinned link is still
//! attached to the live interface of its name.
//!
//! A link pinned by an earlier agent is adopted only if it is attached to the
//! interface that has that name now: an interface deleted while the agent was down
//! takes its programs with it (the kernel detaches the link and leaves the pin), and
//! one recreated under the same name has a new index and no programs.

use std::{ffi::CString, io, path::Path};

use super::bpf_sys::{self, BPF_LINK_TYPE_TCX, BPF_LINK_TYPE_XDP};

/// The index of the interface with this name in the agent's network namespace.
pub fn ifindex(interface: &str) -> Option<u32> {
    let name = CString::new(interface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// How packets on a device begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// With an Ethernet header (Ethernet, veth, bridge, tap, loopback).
    Ethernet,
    /// With the IP header first (tun, WireGuard, ipip, sit, GRE, PPP).
    Ip,
}

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_IP6GRE: u16 = 823;
const ARPHRD_NONE: u16 = 0xfffe;

/// The device's link layer, from its hardware type (`ARPHRD_*`); an error for a
/// device whose packets microseg cannot parse.
pub fn device_kind(interface: &str) -> Result<DeviceKind, String> {
    let hardware_type = hardware_type(interface)
        .map_err(|e| format!("reading the device type of {interface}: {e}"))?;
    match hardware_type {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Ok(DeviceKind::Ethernet),
        ARPHRD_NONE | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT | ARPHRD_IPGRE
        | ARPHRD_IP6GRE | ARPHRD_RAWIP | ARPHRD_PPP => Ok(DeviceKind::Ip),
        other => Err(format!(
            "{interface} has link-layer type {other} (ARPHRD), which microseg cannot parse; only Ethernet and IP (tunnel) devices are enforced"
        )),
    }
}

/// `ifr_hwaddr.sa_family` of the interface (SIOCGIFHWADDR), asked through a socket
/// of the current network namespace.
fn hardware_type(interface: &str) -> io::Result<u16> {
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other("invalid interface name"));
    }
    // SAFETY: socket(2) with constant, valid arguments; the result is checked.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socket` is a new descriptor owned here; OwnedFd closes it.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr within `request`,
    // which lives across the call.
    let result = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFHWADDR as _,
            &mut request as *mut libc::ifreq,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl succeeded, so the union holds ifru_hwaddr.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// What a pinned link is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedLinkState {
    /// No pin at this path.
    NotPinned,
    /// Attached to the live interface of its name.
    Live { program_id: u32 },
    /// Pinned but not attached to the live interface of that name (deleted, or
    /// recreated with another index): it enforces nothing there.
    Stale(String),
}

/// Checks the link pinned at `pin` against the interface named `interface` now.
pub fn pinned_link_state(pin: &Path, interface: &str) -> PinnedLinkState {
    if !pin.exists() {
        return PinnedLinkState::NotPinned;
    }
    let attachment = match bpf_sys::open_pinned(pin).and_then(|fd| bpf_sys::link_attachment(&fd)) {
        Ok(attachment) => attachment,
        Err(e) => return PinnedLinkState::Stale(format!("reading the pinned link: {e}")),
    };
    if attachment.link_type != BPF_LINK_TYPE_XDP && attachment.link_type != BPF_LINK_TYPE_TCX {
        return PinnedLinkState::Stale(format!(
            "the pin holds a link of type {}, not XDP or TCX",
            attachment.link_type
        ));
    }
    match ifindex(interface) {
        None => PinnedLinkState::Stale(format!("interface {interface} does not exist")),
        Some(_) if attachment.ifindex == 0 => {
            PinnedLinkState::Stale("its interface was deleted (the link is detached)".to_owned())
        }
        Some(index) if index != attachment.ifindex => PinnedLinkState::Stale(format!(
            "it is attached to ifindex {}, but {interface} is now ifindex {index} (recreated)",
            attachment.ifindex
        )),
        Some(_) => PinnedLinkState::Live {
            program_id: attachment.program_id,
        },
    }
}

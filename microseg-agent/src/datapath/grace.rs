//! A real grace period for the generation switch: after it, no program still runs
//! that read the old generation.
//!
//! Updating a map-in-map (`BPF_MAP_TYPE_ARRAY_OF_MAPS`) from userspace makes the
//! kernel wait for every running non-sleepable BPF program to finish
//! (`synchronize_rcu()` in `maybe_wait_bpf_programs`, since Linux 4.20) before the
//! syscall returns. XDP and TC programs are non-sleepable, so once the update returns,
//! every packet judged under the old generation has been judged, and its slot may be
//! rewritten. The map-in-map is private to the agent; only the wait matters.

use std::{io, os::fd::OwnedFd};

use super::bpf_sys::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS, create_map, update_u32};

pub struct GracePeriod {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GracePeriod {
    pub fn new() -> io::Result<Self> {
        let inner = create_map(BPF_MAP_TYPE_ARRAY, 1, None, "microseg_grace_i")?;
        let outer = create_map(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            1,
            Some(&inner),
            "microseg_grace",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program that was running when it was called has
    /// finished.
    pub fn wait(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        update_u32(&self.outer, 0, self.inner.as_raw_fd() as u32)
    }
}

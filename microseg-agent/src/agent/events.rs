//! Flow verdict events (denied, audited, and with `traceAllowed` allowed) from the
//! kernel: an async reader drains the ring buffer, names what it can and publishes
//! each event into the flow history (`crate::flow_history`).

use std::sync::{Arc, PoisonError, RwLock};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    datapath::events::DecodedEvent,
    event_view::{EventNames, event_json},
    flow_history::EventHub,
};

/// Opens the pinned event ring buffer.
pub fn open_ring(pin_dir: &std::path::Path) -> anyhow::Result<RingBuf<MapData>> {
    let path = pin_dir.join("maps").join(microseg_common::maps::EVENTS);
    let map =
        MapData::from_pin(&path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    Ok(RingBuf::try_from(aya::maps::Map::RingBuf(map))?)
}

/// Reads the ring buffer until the process ends: waits for the ring's readiness
/// (epoll), drains every record, and publishes each as a JSON line.
pub async fn read_ring(
    ring: RingBuf<MapData>,
    hub: Arc<EventHub>,
    names: Arc<RwLock<Arc<EventNames>>>,
    node_name: String,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as
    // long as the RingBuf lives, and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut interface_names = std::collections::HashMap::<u32, String>::new();
    loop {
        let mut guard = ring.readable_mut().await?;
        let names_now = names.read().unwrap_or_else(PoisonError::into_inner).clone();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(event) = DecodedEvent::decode(&item) else {
                continue;
            };
            crate::fault::panic_once_at("event-reader-panic");
            let interface = interface_names
                .entry(event.ifindex)
                .or_insert_with(|| interface_name(event.ifindex));
            let json = event_json(&event, &names_now, &node_name, Some(interface));
            hub.publish(Arc::from(json.to_string()));
        }
        guard.clear_ready();
        hub.flush_log();
    }
}

fn interface_name(ifindex: u32) -> String {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes (NUL included) into the
    // buffer, which has that size.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
    if name.is_null() {
        return String::new();
    }
    // SAFETY: on success the buffer holds a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

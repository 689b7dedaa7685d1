//! Enforced local endpoints, by address.

use aya_ebpf::{macros::map, maps::HashMap};
use microseg_common::{AddrKey, endpoint::EndpointInfo, maps::ENDPOINTS_CAPACITY};

/// BPF_F_NO_PREALLOC: memory only for the endpoints that exist.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static ENDPOINTS: HashMap<AddrKey, EndpointInfo> =
    HashMap::with_max_entries(ENDPOINTS_CAPACITY, BPF_F_NO_PREALLOC);

/// The endpoint at `addr`, or `NOT_AN_ENDPOINT` (no flags: nothing enforced).
/// A plain value rather than an `Option`: LLVM's BPF backend can turn the
/// combinations of optional values into reads of undefined registers, which the
/// verifier rejects.
#[inline(always)]
pub fn lookup(slot: u8, addr: &[u8; 16]) -> EndpointInfo {
    // SAFETY: the value is copied out at once; a concurrent update could replace it,
    // but never with memory of another type.
    match unsafe { ENDPOINTS.get(&AddrKey::new(slot, *addr)) } {
        Some(info) => *info,
        None => NOT_AN_ENDPOINT,
    }
}

pub const NOT_AN_ENDPOINT: EndpointInfo = EndpointInfo::new(0, 0);

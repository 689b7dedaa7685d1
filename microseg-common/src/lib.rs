//! Types shared by microseg's kernel programs and its userspace.
//!
//! Every map key and value and the event record is `#[repr(C)]` with explicit padding
//! and a `const` size assertion, so the eBPF side and userspace agree byte for byte.
//! With the `user` feature each type implements `aya::Pod`.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod drop_reason;
pub mod endpoint;
pub mod event;
pub mod fragment;
pub mod identity;
pub mod interface;
pub mod maps;
pub mod policy;
pub mod rule_hits;

pub use addr::AddrKey;
pub use drop_reason::DropReason;

/// Implements `aya::Pod` for plain-old-data types (userspace only).
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)], Copy, has no implicit padding (explicit
            // `_pad` fields and a const size assertion) and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use impl_pod;

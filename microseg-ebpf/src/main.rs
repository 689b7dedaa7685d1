//! microseg's kernel programs. XDP (ingress) and TC (ingress and egress) share one
//! decision path, `verdict::judge`; this file only adapts each hook's context and
//! maps the verdict to the hook's return code.
#![no_std]
#![no_main]
// The event budget is shared by every CPU and updated with BPF_CMPXCHG: the bpfel
// target offers no atomic read-modify-write types, the intrinsic emits it directly.
#![expect(
    internal_features,
    reason = "core::intrinsics::atomic_cxchg (events.rs)"
)]
#![feature(core_intrinsics)]

mod config;
mod conntrack;
mod counters;
mod endpoint;
mod events;
mod fragment;
mod hold;
mod identity;
mod interface;
mod packet;
mod parse;
mod policy;
mod related;
mod rule_hits;
mod scratch;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use microseg_common::event::Hook;

use crate::{packet::PacketView, parse::LinkLayer, verdict::Verdict};

/// XDP runs only on Ethernet devices (the agent refuses others at attach).
#[xdp]
pub fn microseg_xdp(ctx: XdpContext) -> u32 {
    let packet = PacketView::new(ctx.data(), ctx.data_end());
    let link = LinkLayer::Ethernet { skb_protocol: 0 };
    match verdict::judge(&packet, link, Hook::Xdp, ctx.ingress_ifindex() as u32) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn microseg_tc_ingress(ctx: TcContext) -> i32 {
    judge_skb(&ctx, Hook::TcIngress, true)
}

#[classifier]
pub fn microseg_tc_egress(ctx: TcContext) -> i32 {
    judge_skb(&ctx, Hook::TcEgress, true)
}

/// For devices without a link-layer header (tun, WireGuard, ipip): the agent picks
/// these programs by the device's type at attach.
#[classifier]
pub fn microseg_tc_ingress_l3(ctx: TcContext) -> i32 {
    judge_skb(&ctx, Hook::TcIngress, false)
}

#[classifier]
pub fn microseg_tc_egress_l3(ctx: TcContext) -> i32 {
    judge_skb(&ctx, Hook::TcEgress, false)
}

/// The held programs (`hold`): for an interface whose binding the agent could not
/// write. They read no map; Ethernet devices only.
#[xdp]
pub fn microseg_xdp_hold(ctx: XdpContext) -> u32 {
    let packet = PacketView::new(ctx.data(), ctx.data_end());
    let link = LinkLayer::Ethernet { skb_protocol: 0 };
    match hold::judge_held(&packet, link, Hook::Xdp, ctx.ingress_ifindex() as u32) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn microseg_tc_hold_ingress(ctx: TcContext) -> i32 {
    hold_skb(&ctx, Hook::TcIngress)
}

#[classifier]
pub fn microseg_tc_hold_egress(ctx: TcContext) -> i32 {
    hold_skb(&ctx, Hook::TcEgress)
}

#[inline(always)]
fn hold_skb(ctx: &TcContext, hook: Hook) -> i32 {
    let (packet, link, ifindex) = skb_view(ctx, true);
    match hold::judge_held(&packet, link, hook, ifindex) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

/// Bytes made linear before parsing: enough for Ethernet, two VLAN tags, IPv6 with
/// extension headers and a transport header.
const TC_LINEAR_BYTES: u32 = 256;

#[inline(always)]
fn judge_skb(ctx: &TcContext, hook: Hook, ethernet: bool) -> i32 {
    let (packet, link, ifindex) = skb_view(ctx, ethernet);
    match verdict::judge(&packet, link, hook, ifindex) {
        // TC_ACT_UNSPEC lets later programs on the hook run (TCX_NEXT).
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

/// The packet's headers made linear, its link layer and the interface it is on.
#[inline(always)]
fn skb_view(ctx: &TcContext, ethernet: bool) -> (PacketView, LinkLayer, u32) {
    let wanted = ctx.len().min(TC_LINEAR_BYTES);
    if ((ctx.data_end() - ctx.data()) as u32) < wanted {
        // Headers in paged data: pull them into the linear area. On failure the parse
        // sees a short packet and applies the malformed-packet rule.
        let _ = ctx.pull_data(wanted);
    }
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reading
    // `ifindex` is an allowed context access.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The skb's protocol is a big-endian 16-bit value in a 32-bit field.
    let skb_protocol = u16::from_be(ctx.skb.protocol() as u16);
    let link = if ethernet {
        LinkLayer::Ethernet { skb_protocol }
    } else {
        LinkLayer::None { skb_protocol }
    };
    (PacketView::new(ctx.data(), ctx.data_end()), link, ifindex)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! End to end on a device without an Ethernet header: a tun device (IFF_TUN, no
//! packet information) in a network namespace, its remote side played by the test
//! through the tun file descriptor. Raw IPv4 and IPv6 UDP datagrams written to the
//! descriptor arrive on the device (TC ingress) and reach real sockets; what the
//! namespace's stack sends to the peer is read back from the descriptor (TC egress).
//! microseg's TC programs, attached to that device, are the IP-header ones
//! (`microseg_tc_ingress_l3`, `microseg_tc_egress_l3`) and enforce the policy both
//! ways, with deny events; XDP is refused on such a device with a clear error.

use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, tc::TcAttachType};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use microseg::datapath::{
    AttachPoint, Datapath, DatapathError, LoadOptions, XdpAttachMode,
    events::{DecodedEvent, drain},
};
use microseg_common::{
    DropReason,
    event::{EventVerdict, Hook},
    maps::{PROG_TC_EGRESS_L3, PROG_TC_INGRESS_L3},
    policy::Direction,
};
use microseg_tests::{
    harness::{StateBuilder, ip},
    netns::{NetNs, unique_name},
    topology::EchoServers,
};

const LOCAL_V4: &str = "10.91.0.1";
const PEER_V4: &str = "10.91.0.2";
const LOCAL_V6: &str = "fd91::1";
const PEER_V6: &str = "fd91::2";

const UDP: Option<u8> = Some(17);
const PEER_IDENTITY: u32 = 300;
const ENDPOINT_ID: u32 = 1;
/// Ports of the namespace's echo servers: 53 is allowed from the peer, 54 is not.
const ALLOWED_IN: u16 = 53;
const DENIED_IN: u16 = 54;
/// Ports on the peer: the endpoint may send to 7000, not to 7001.
const ALLOWED_OUT: u16 = 7000;
const DENIED_OUT: u16 = 7001;

/// How long the peer waits for a datagram before calling it blocked.
const WAIT: Duration = Duration::from_millis(500);

/// A source port for each probe, so that no probe's flow is another's.
fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(40_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A tun device (IFF_TUN | IFF_NO_PI) created inside a namespace, with the
/// addresses 10.91.0.1/24 and fd91::1/64, up. The device lives as long as the
/// descriptor: dropping it (or the namespace) removes the device.
struct Tun {
    file: File,
    name: String,
    ifindex: u32,
}

impl Tun {
    fn new(ns: &NetNs) -> Self {
        let name = unique_name("mtun");
        let (file, ifindex) = ns.run_in(|| {
            // Opened from inside the namespace: the device is created in it.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")
                .expect("opening /dev/net/tun");
            // SAFETY: ifreq is plain old data; all zeroes is a valid value.
            let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
            assert!(name.len() < libc::IFNAMSIZ, "interface name too long");
            for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
                *slot = *byte as libc::c_char;
            }
            request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads ifr_name and ifr_flags from `request` (and may
            // write the name back), which lives across the call; the descriptor is
            // open.
            let result = unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    libc::TUNSETIFF as _,
                    &mut request as *mut libc::ifreq,
                )
            };
            assert!(
                result == 0,
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            );
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).expect("tun ifindex");
            (file, ifindex)
        });
        for addr in [format!("{LOCAL_V4}/24"), format!("{LOCAL_V6}/64")] {
            let mut command = vec!["ip", "addr", "add", &addr, "dev", &name];
            if addr.contains(':') {
                command.push("nodad");
            }
            ns.exec(&command);
        }
        ns.exec(&["ip", "link", "set", &name, "up"]);
        Self {
            file,
            name,
            ifindex,
        }
    }

    /// The peer sends a UDP datagram: it arrives on the device.
    fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let builder = match (from.ip(), to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => panic!("mixed families {from} -> {to}"),
        }
        .udp(from.port(), to.port());
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut packet, payload).expect("building");
        let written = (&self.file).write(&packet).expect("writing to the tun");
        assert_eq!(written, packet.len(), "short write to the tun");
    }

    /// Waits up to `WAIT` for the stack to send the peer the UDP datagram
    /// `from` -> `to` carrying `payload`; anything else read meanwhile (router
    /// solicitations, MLD reports, other probes' datagrams) is skipped.
    fn receive(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            match (&self.file).read(&mut buf) {
                Ok(n) => {
                    if udp_of(&buf[..n])
                        .is_some_and(|(s, d, p)| s == from && d == to && p == payload)
                    {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("reading the tun: {e}"),
            }
        }
        false
    }
}

/// Source, destination and payload of an IP packet carrying UDP.
fn udp_of(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (source, destination): (IpAddr, IpAddr) = match sliced.net? {
        NetSlice::Ipv4(v4) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        NetSlice::Arp(_) => return None,
    };
    let TransportSlice::Udp(udp) = sliced.transport? else {
        return None;
    };
    Some((
        SocketAddr::new(source, udp.source_port()),
        SocketAddr::new(destination, udp.destination_port()),
        udp.payload().to_vec(),
    ))
}

/// The peer (`peer` address, a fresh source port) sends a datagram to `local:port`
/// and waits for the echo server's reply. Returns the source port used and whether
/// the echo came back.
fn peer_exchange(tun: &Tun, peer: &str, local: &str, port: u16) -> (u16, bool) {
    let source_port = next_port();
    let peer = SocketAddr::new(ip(peer), source_port);
    let local = SocketAddr::new(ip(local), port);
    let payload = format!("microseg-l3 {peer} -> {local}").into_bytes();
    tun.send(peer, local, &payload);
    (source_port, tun.receive(local, peer, &payload))
}

/// A socket in the namespace (`local` address, a fresh port) sends a datagram to
/// `peer:port`. Returns the source port used and whether the datagram left the device.
fn local_send(ns: &NetNs, tun: &Tun, local: &str, peer: &str, port: u16) -> (u16, bool) {
    let source_port = next_port();
    let local = SocketAddr::new(ip(local), source_port);
    let peer = SocketAddr::new(ip(peer), port);
    let payload = format!("microseg-l3 {local} -> {peer}").into_bytes();
    ns.run_in(|| {
        let socket = UdpSocket::bind(local).expect("bind");
        // A datagram dropped by TC egress is not an error for UDP (or ENOBUFS):
        // what counts is whether it reaches the peer.
        let _ = socket.send_to(&payload, peer);
    });
    (source_port, tun.receive(local, peer, &payload))
}

/// The endpoint (both addresses of the tun device) accepts UDP 53 from the peer
/// and may send UDP 7000 to it; everything else is denied both ways.
fn policy() -> StateBuilder {
    StateBuilder::default()
        .endpoint(LOCAL_V4, ENDPOINT_ID, true, true, false)
        .endpoint(LOCAL_V6, ENDPOINT_ID, true, true, false)
        .host(PEER_V4, PEER_IDENTITY)
        .host(PEER_V6, PEER_IDENTITY)
        .allow(
            ENDPOINT_ID,
            PEER_IDENTITY,
            Direction::Ingress,
            UDP,
            Some((ALLOWED_IN, ALLOWED_IN)),
            1,
        )
        .allow(
            ENDPOINT_ID,
            PEER_IDENTITY,
            Direction::Egress,
            UDP,
            Some((ALLOWED_OUT, ALLOWED_OUT)),
            2,
        )
}

/// The id of the program `name` of `datapath`.
fn program_id(datapath: &Datapath, name: &str) -> u32 {
    datapath
        .ebpf()
        .program(name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .info()
        .expect("program info")
        .id()
}

/// The ids of the programs attached with TCX at `attach_type` of `interface`
/// (asked from inside its namespace).
fn tcx_programs(ns: &NetNs, interface: &str, attach_type: TcAttachType) -> Vec<u32> {
    ns.run_in(|| {
        let (_, programs) =
            SchedClassifier::query_tcx(interface, attach_type).expect("querying tcx");
        programs.iter().map(|p| p.id()).collect()
    })
}

/// The one UDP deny event from `source` to `destination` in `events`.
fn deny_event(
    events: &[DecodedEvent],
    source: SocketAddr,
    destination: SocketAddr,
) -> &DecodedEvent {
    let matching: Vec<&DecodedEvent> = events
        .iter()
        .filter(|e| {
            e.protocol == 17
                && e.source == Some(source.ip())
                && e.destination == Some(destination.ip())
                && e.source_port == source.port()
                && e.destination_port == destination.port()
        })
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one event for UDP {source} -> {destination} in {events:?}"
    );
    matching[0]
}

#[test]
fn tc_programs_enforce_policy_on_a_tun_device() {
    if !microseg_tests::kernel_available("tc_programs_enforce_policy_on_a_tun_device") {
        return;
    }
    let ns = NetNs::new("msl3");
    let tun = Tun::new(&ns);
    let _echo = EchoServers::start(&ns, &[ALLOWED_IN, DENIED_IN]);
    let output = ns.exec(&["ip", "-d", "link", "show", "dev", &tun.name]);
    let link = String::from_utf8_lossy(&output.stdout);
    assert!(
        link.contains("link/none"),
        "{} should have no link-layer header: {link}",
        tun.name
    );

    // Before microseg: the peer reaches both echo servers and receives what the
    // namespace sends it, in both families. The first exchanges are retried while the
    // device settles; this also proves the test's method (writing and reading the
    // tun descriptor) works.
    for (local, peer) in [(LOCAL_V4, PEER_V4), (LOCAL_V6, PEER_V6)] {
        let ready = (0..20).any(|_| peer_exchange(&tun, peer, local, DENIED_IN).1);
        assert!(
            ready,
            "sanity: the echo on UDP {DENIED_IN} never came back to {peer}"
        );
        assert!(
            peer_exchange(&tun, peer, local, ALLOWED_IN).1,
            "sanity: UDP {ALLOWED_IN} from {peer} echoes"
        );
        assert!(
            local_send(&ns, &tun, local, peer, DENIED_OUT).1,
            "sanity: UDP {DENIED_OUT} from {local} reaches the peer"
        );
    }

    let mut datapath = Datapath::load(&LoadOptions::default()).expect("load");
    let mut events = datapath.take_events().expect("events");
    datapath
        .apply(&Default::default(), &policy().build())
        .expect("apply");
    ns.run_in(|| {
        datapath
            .attach(&tun.name, AttachPoint::TcIngress)
            .expect("attach tc ingress to the tun");
        datapath
            .attach(&tun.name, AttachPoint::TcEgress)
            .expect("attach tc egress to the tun");
    });
    // The programs attached are the ones that parse from the IP header.
    assert_eq!(
        tcx_programs(&ns, &tun.name, TcAttachType::Ingress),
        vec![program_id(&datapath, PROG_TC_INGRESS_L3)],
        "TC ingress of the tun runs {PROG_TC_INGRESS_L3}"
    );
    assert_eq!(
        tcx_programs(&ns, &tun.name, TcAttachType::Egress),
        vec![program_id(&datapath, PROG_TC_EGRESS_L3)],
        "TC egress of the tun runs {PROG_TC_EGRESS_L3}"
    );
    drain(&mut events);

    let mut denied_in = Vec::new();
    let mut denied_out = Vec::new();
    for (local, peer) in [(LOCAL_V4, PEER_V4), (LOCAL_V6, PEER_V6)] {
        // Ingress: UDP 53 reaches the server and its reply passes egress (a reply
        // of an allowed flow); UDP 54 is dropped on arrival.
        assert!(
            peer_exchange(&tun, peer, local, ALLOWED_IN).1,
            "UDP {ALLOWED_IN} from {peer} to {local} allowed, echo returned"
        );
        let (port, echoed) = peer_exchange(&tun, peer, local, DENIED_IN);
        assert!(!echoed, "UDP {DENIED_IN} from {peer} to {local} blocked");
        denied_in.push((
            SocketAddr::new(ip(peer), port),
            SocketAddr::new(ip(local), DENIED_IN),
        ));
        // Egress: the endpoint may send UDP 7000 to the peer, not 7001.
        assert!(
            local_send(&ns, &tun, local, peer, ALLOWED_OUT).1,
            "UDP {ALLOWED_OUT} from {local} to {peer} allowed"
        );
        let (port, sent) = local_send(&ns, &tun, local, peer, DENIED_OUT);
        assert!(!sent, "UDP {DENIED_OUT} from {local} to {peer} blocked");
        denied_out.push((
            SocketAddr::new(ip(local), port),
            SocketAddr::new(ip(peer), DENIED_OUT),
        ));
    }

    let seen = drain(&mut events);
    for (source, destination) in denied_in {
        let event = deny_event(&seen, source, destination);
        assert_eq!(event.verdict, Some(EventVerdict::Dropped), "{event:?}");
        assert_eq!(event.reason, Some(DropReason::PolicyDenied), "{event:?}");
        assert_eq!(event.direction, Some(Direction::Ingress), "{event:?}");
        assert_eq!(event.hook, Some(Hook::TcIngress), "{event:?}");
        assert_eq!(event.endpoint_id, ENDPOINT_ID, "{event:?}");
        assert_eq!(event.peer_identity, PEER_IDENTITY, "{event:?}");
        assert_eq!(event.ifindex, tun.ifindex, "{event:?}");
    }
    for (source, destination) in denied_out {
        let event = deny_event(&seen, source, destination);
        assert_eq!(event.verdict, Some(EventVerdict::Dropped), "{event:?}");
        assert_eq!(event.reason, Some(DropReason::PolicyDenied), "{event:?}");
        assert_eq!(event.direction, Some(Direction::Egress), "{event:?}");
        assert_eq!(event.hook, Some(Hook::TcEgress), "{event:?}");
        assert_eq!(event.endpoint_id, ENDPOINT_ID, "{event:?}");
        assert_eq!(event.peer_identity, PEER_IDENTITY, "{event:?}");
        assert_eq!(event.ifindex, tun.ifindex, "{event:?}");
    }
    // No allowed exchange (nor its reply) was denied anywhere.
    let wrongly_denied: Vec<&DecodedEvent> = seen
        .iter()
        .filter(|e| {
            e.verdict == Some(EventVerdict::Dropped)
                && [e.source_port, e.destination_port]
                    .iter()
                    .any(|p| matches!(*p, ALLOWED_IN | ALLOWED_OUT))
        })
        .collect();
    assert!(
        wrongly_denied.is_empty(),
        "allowed flows were denied: {wrongly_denied:?}"
    );
    drop(datapath);
    drop(tun);
}

#[test]
fn xdp_is_refused_on_a_device_without_link_layer_header() {
    if !microseg_tests::kernel_available("xdp_is_refused_on_a_device_without_link_layer_header") {
        return;
    }
    let ns = NetNs::new("msx3");
    let tun = Tun::new(&ns);
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("load");
    ns.run_in(|| {
        for mode in [
            XdpAttachMode::Default,
            XdpAttachMode::Driver,
            XdpAttachMode::Generic,
        ] {
            let error = datapath
                .attach(&tun.name, AttachPoint::Xdp(mode))
                .expect_err("XDP must be refused on a tun device");
            assert!(
                matches!(&error, DatapathError::Attach { interface, .. } if *interface == tun.name),
                "{mode:?}: {error:?}"
            );
            let message = error.to_string();
            assert!(
                message.contains("link-layer header") && message.contains("tc"),
                "{mode:?}: the error should say the device has no link-layer header and to use tc: {message}"
            );
        }
        // tc is what works there.
        datapath
            .attach(&tun.name, AttachPoint::TcIngress)
            .expect("attach tc ingress to the tun");
    });
    // Nothing was attached as XDP.
    let output = ns.exec(&["ip", "-d", "link", "show", "dev", &tun.name]);
    let link = String::from_utf8_lossy(&output.stdout);
    assert!(link.contains("link/none"), "{link}");
    assert!(!link.contains("xdp"), "an XDP program is attached: {link}");
    assert_eq!(
        tcx_programs(&ns, &tun.name, TcAttachType::Ingress),
        vec![program_id(&datapath, PROG_TC_INGRESS_L3)],
    );
}

//! Two hosts in network namespaces joined by a veth pair, with real sockets: the
//! end-to-end tests' and the demo's test bed. microseg's programs are attached to the
//! server's interface (XDP and TC ingress for what arrives, TC egress for what
//! leaves), as on a host enforcing its own services.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use microseg::datapath::{AttachPoint, Datapath, XdpAttachMode};

use crate::netns::{NetNs, VethLink};

pub const CLIENT_V4: &str = "10.77.0.1";
pub const SERVER_V4: &str = "10.77.0.2";
pub const CLIENT_V6: &str = "fd77::1";
pub const SERVER_V6: &str = "fd77::2";

/// How long a probe waits before calling a silent connection blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

pub struct TwoHosts {
    pub client: NetNs,
    pub server: NetNs,
    pub link: VethLink,
}

impl TwoHosts {
    pub fn new() -> Self {
        let client = NetNs::new("msc");
        let server = NetNs::new("mss");
        let link = VethLink::new(
            &client,
            &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
            &server,
            &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
        );
        // IPv6 on a new link is usable only after the kernel's link watch has run
        // (about a second): wait until both families answer.
        for addr in [SERVER_V4, SERVER_V6] {
            let ready = (0..20).any(|_| {
                client
                    .try_exec(&["ping", "-c1", "-W1", addr])
                    .status
                    .success()
            });
            assert!(
                ready,
                "{addr} never answered a ping from the client namespace"
            );
        }
        Self {
            client,
            server,
            link,
        }
    }

    /// Attaches the programs to the server's interface: XDP for arriving packets and
    /// TC egress for leaving ones (or TC ingress instead of XDP with `tc_only`).
    pub fn attach(&self, datapath: &mut Datapath, tc_only: bool) {
        let iface = self.link.b_if.clone();
        self.server.run_in(|| {
            if tc_only {
                datapath
                    .attach(&iface, AttachPoint::TcIngress)
                    .expect("attach tc ingress");
            } else {
                datapath
                    .attach(&iface, AttachPoint::Xdp(XdpAttachMode::Default))
                    .expect("attach xdp");
            }
            datapath
                .attach(&iface, AttachPoint::TcEgress)
                .expect("attach tc egress");
        });
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP server in `ns` on `port` that echoes one message per connection, for as
/// long as the returned guard lives.
pub struct EchoServers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServers {
    /// Listens on TCP and UDP `ports` on every address of `ns`.
    pub fn start(ns: &NetNs, ports: &[u16]) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let (tcp, udp) = ns.run_in(|| {
                let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
                let udp = UdpSocket::bind(("::", port)).expect("bind udp");
                (tcp, udp)
            });
            tcp.set_nonblocking(true).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let stop_tcp = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop_tcp.load(std::sync::atomic::Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            conn.set_nonblocking(false).ok();
                            conn.set_read_timeout(Some(Duration::from_secs(2))).ok();
                            let mut buf = [0u8; 256];
                            while let Ok(n) = conn.read(&mut buf) {
                                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            let stop_udp = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while !stop_udp.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Connects from `ns` to `addr:port` over TCP and exchanges one message. True if the
/// echo came back.
pub fn tcp_exchange(ns: &NetNs, addr: IpAddr, port: u16) -> bool {
    ns.run_in(|| {
        let mut stream =
            match TcpStream::connect_timeout(&SocketAddr::new(addr, port), PROBE_TIMEOUT) {
                Ok(stream) => stream,
                Err(_) => return false,
            };
        stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok();
        if stream.write_all(b"microseg").is_err() {
            return false;
        }
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf).is_ok() && &buf == b"microseg"
    })
}

/// Sends one UDP datagram from `ns` to `addr:port` and waits for the echo.
pub fn udp_exchange(ns: &NetNs, addr: IpAddr, port: u16) -> bool {
    ns.run_in(|| {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).expect("bind");
        socket.set_read_timeout(Some(PROBE_TIMEOUT)).ok();
        if socket.send_to(b"microseg", (addr, port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(socket.recv_from(&mut buf), Ok((8, _)))
    })
}

//! The programs pass the verifier and give a verdict on an empty policy.

use microseg::datapath::{
    AttachPoint, Datapath, LoadOptions, ProgramVerdict, XdpAttachMode, probe::Probe,
};

#[test]
fn programs_load_and_pass_unenforced_traffic() {
    if !microseg_tests::kernel_available("programs_load_and_pass_unenforced_traffic") {
        return;
    }
    let datapath = Datapath::load(&LoadOptions::default()).expect("load");
    let probe = Probe::tcp(
        "10.0.0.1".parse().unwrap(),
        1234,
        "10.0.0.2".parse().unwrap(),
        80,
    );
    for point in [
        AttachPoint::Xdp(XdpAttachMode::Default),
        AttachPoint::TcIngress,
        AttachPoint::TcEgress,
    ] {
        assert_eq!(
            datapath.test_run(point, &probe.to_frame()).unwrap(),
            ProgramVerdict::Pass
        );
    }
}

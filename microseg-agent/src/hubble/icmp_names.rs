//! ICMP types and codes by the names Cilium's flow summaries give them
//! (`ICMPv4 EchoRequest`): gopacket's `ICMPv4TypeCode`/`ICMPv6TypeCode.String`,
//! which Cilium's parser prints.

/// An ICMPv4 type and code as Cilium's summaries name them (gopacket's
/// `ICMPv4TypeCode.String`: `EchoRequest`, `DestinationUnreachable(Port)`).
pub fn v4(r#type: u32, code: u32) -> String {
    let unreachable: &[&str] = &[
        "Net",
        "Host",
        "Protocol",
        "Port",
        "FragmentationNeeded",
        "SourceRoutingFailed",
        "NetUnknown",
        "HostUnknown",
        "SourceIsolated",
        "NetAdminProhibited",
        "HostAdminProhibited",
        "NetTOS",
        "HostTOS",
        "CommAdminProhibited",
        "HostPrecedence",
        "PrecedenceCutoff",
    ];
    let (name, codes): (&str, Option<&[&str]>) = match r#type {
        0 => ("EchoReply", None),
        3 => ("DestinationUnreachable", Some(unreachable)),
        4 => ("SourceQuench", None),
        5 => ("Redirect", Some(&["Net", "Host", "TOS+Net", "TOS+Host"])),
        8 => ("EchoRequest", None),
        9 => ("RouterAdvertisement", None),
        10 => ("RouterSolicitation", None),
        11 => (
            "TimeExceeded",
            Some(&["TTLExceeded", "FragmentReassemblyTimeExceeded"]),
        ),
        12 => (
            "ParameterProblem",
            Some(&["PointerIndicatesError", "MissingOption", "BadLength"]),
        ),
        13 => ("TimestampRequest", None),
        14 => ("TimestampReply", None),
        15 => ("InfoRequest", None),
        16 => ("InfoReply", None),
        17 => ("AddressMaskRequest", None),
        18 => ("AddressMaskReply", None),
        _ => return format!("{type}({code})"),
    };
    icmp_name(name, codes, code)
}

/// An ICMPv6 type and code as Cilium's summaries name them (gopacket's
/// `ICMPv6TypeCode.String`).
pub fn v6(r#type: u32, code: u32) -> String {
    let (name, codes): (&str, Option<&[&str]>) = match r#type {
        1 => (
            "DestinationUnreachable",
            Some(&[
                "NoRouteToDst",
                "AdminProhibited",
                "BeyondScopeOfSrc",
                "AddressUnreachable",
                "PortUnreachable",
                "SrcAddressFailedPolicy",
                "RejectRouteToDst",
            ]),
        ),
        2 => ("PacketTooBig", None),
        3 => (
            "TimeExceeded",
            Some(&["HopLimitExceeded", "FragmentReassemblyTimeExceeded"]),
        ),
        4 => (
            "ParameterProblem",
            Some(&[
                "ErroneousHeaderField",
                "UnrecognizedNextHeader",
                "UnrecognizedIPv6Option",
            ]),
        ),
        128 => ("EchoRequest", None),
        129 => ("EchoReply", None),
        133 => ("RouterSolicitation", None),
        134 => ("RouterAdvertisement", None),
        135 => ("NeighborSolicitation", None),
        136 => ("NeighborAdvertisement", None),
        137 => ("Redirect", None),
        _ => return format!("{type}({code})"),
    };
    icmp_name(name, codes, code)
}

/// gopacket's rule: the bare name for a type without codes and code 0, the code's
/// name in parentheses, else `(Code: N)`.
fn icmp_name(name: &str, codes: Option<&[&str]>, code: u32) -> String {
    let code_name = codes.and_then(|codes| usize::try_from(code).ok().and_then(|c| codes.get(c)));
    match (codes, code_name) {
        (None, _) if code == 0 => name.to_owned(),
        (_, Some(code_name)) => format!("{name}({code_name})"),
        _ => format!("{name}(Code: {code})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_gopackets_rules() {
        assert_eq!(v4(8, 0), "EchoRequest");
        assert_eq!(v4(3, 3), "DestinationUnreachable(Port)");
        assert_eq!(v4(5, 2), "Redirect(TOS+Net)");
        assert_eq!(v4(0, 1), "EchoReply(Code: 1)");
        assert_eq!(v4(3, 99), "DestinationUnreachable(Code: 99)");
        assert_eq!(v4(42, 1), "42(1)");
        assert_eq!(v6(128, 0), "EchoRequest");
        assert_eq!(v6(1, 4), "DestinationUnreachable(PortUnreachable)");
        assert_eq!(v6(134, 0), "RouterAdvertisement");
        assert_eq!(v6(3, 0), "TimeExceeded(HopLimitExceeded)");
    }
}

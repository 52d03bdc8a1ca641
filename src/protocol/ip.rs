//! IP packets as capture files carry them, down to UDP datagrams and TCP segments: what
//! `capture import` needs to read an SMP-over-UDP capture or a WebSocket one (tcpdump,
//! Wireshark, text2pcap).
//!
//! Sans-IO, never panics. Link layers (pcap `LINKTYPE_*`): NULL/loopback (0, a 4-byte
//! address family in either byte order), Ethernet (1, with 802.1Q tags), raw IP (101,
//! 228 IPv4, 229 IPv6), Linux cooked SLL (113) and SLL2 (276). IPv4 with options, IPv6
//! without extension headers; fragments are reported, not reassembled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const LINKTYPE_NULL: u32 = 0;
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_LINUX_SLL: u32 = 113;
pub const LINKTYPE_IPV4: u32 = 228;
pub const LINKTYPE_IPV6: u32 = 229;
pub const LINKTYPE_LINUX_SLL2: u32 = 276;

const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;

/// Whether a link type is one [`udp_datagram`] and [`tcp_segment`] read.
pub fn is_ip_linktype(linktype: u32) -> bool {
    matches!(linktype, LINKTYPE_NULL | LINKTYPE_ETHERNET | LINKTYPE_RAW | LINKTYPE_LINUX_SLL | LINKTYPE_IPV4 | LINKTYPE_IPV6 | LINKTYPE_LINUX_SLL2)
}

/// One UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// One TCP segment: its ends, sequence number, flags and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub payload: &'a [u8],
}

/// Why a packet gave no datagram or segment. `Other` is ordinary traffic to skip; the
/// others are worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpSkip {
    /// Not IP, or IP of another protocol than the one asked for (ICMP, ARP, …).
    Other,
    /// Shorter than its headers say.
    Truncated(&'static str),
    /// An IPv4 fragment (reassembly is not done).
    Fragment,
}

impl std::fmt::Display for IpSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpSkip::Other => f.write_str("not the protocol asked for"),
            IpSkip::Truncated(what) => write!(f, "{what} is cut short"),
            IpSkip::Fragment => f.write_str("an IPv4 fragment (fragments are not reassembled)"),
        }
    }
}

/// The UDP datagram in a captured packet of `linktype`.
pub fn udp_datagram(linktype: u32, data: &[u8]) -> Result<UdpDatagram<'_>, IpSkip> {
    let p = ip_packet(linktype, data, IPPROTO_UDP)?;
    let h = p.body.get(..8).ok_or(IpSkip::Truncated("UDP header"))?;
    let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if len < 8 {
        return Err(IpSkip::Truncated("UDP header"));
    }
    let payload = p.body.get(8..len).ok_or(IpSkip::Truncated("UDP datagram"))?;
    Ok(UdpDatagram { src: SocketAddr::new(p.src, u16::from_be_bytes([h[0], h[1]])), dst: SocketAddr::new(p.dst, u16::from_be_bytes([h[2], h[3]])), payload })
}

/// The TCP segment in a captured packet of `linktype`.
pub fn tcp_segment(linktype: u32, data: &[u8]) -> Result<TcpSegment<'_>, IpSkip> {
    let p = ip_packet(linktype, data, IPPROTO_TCP)?;
    let h = p.body.get(..20).ok_or(IpSkip::Truncated("TCP header"))?;
    let offset = usize::from(h[12] >> 4) * 4;
    if offset < 20 {
        return Err(IpSkip::Truncated("TCP header"));
    }
    let payload = p.body.get(offset..).ok_or(IpSkip::Truncated("TCP header"))?;
    let flags = h[13];
    Ok(TcpSegment {
        src: SocketAddr::new(p.src, u16::from_be_bytes([h[0], h[1]])),
        dst: SocketAddr::new(p.dst, u16::from_be_bytes([h[2], h[3]])),
        seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        fin: flags & 0x01 != 0,
        syn: flags & 0x02 != 0,
        rst: flags & 0x04 != 0,
        ack: flags & 0x10 != 0,
        payload,
    })
}

/// An IP packet's ends and the body it carries for `proto`.
struct IpPacket<'a> {
    src: IpAddr,
    dst: IpAddr,
    body: &'a [u8],
}

fn ip_packet(linktype: u32, data: &[u8], proto: u8) -> Result<IpPacket<'_>, IpSkip> {
    let (version_hint, ip) = match linktype {
        LINKTYPE_NULL => {
            let fam = data.get(..4).ok_or(IpSkip::Truncated("loopback header"))?;
            let le = u32::from_le_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let be = u32::from_be_bytes([fam[0], fam[1], fam[2], fam[3]]);
            let v = match (le, be) {
                (2, _) | (_, 2) => 4,
                (24 | 28 | 30, _) | (_, 24 | 28 | 30) => 6,
                _ => return Err(IpSkip::Other),
            };
            (Some(v), &data[4..])
        }
        LINKTYPE_ETHERNET => {
            let mut at = 12;
            loop {
                let t = data.get(at..at + 2).ok_or(IpSkip::Truncated("Ethernet header"))?;
                match u16::from_be_bytes([t[0], t[1]]) {
                    0x8100 | 0x88A8 => at += 4,
                    0x0800 => break (Some(4), &data[at + 2..]),
                    0x86DD => break (Some(6), &data[at + 2..]),
                    _ => return Err(IpSkip::Other),
                }
            }
        }
        LINKTYPE_RAW => (None, data),
        LINKTYPE_IPV4 => (Some(4), data),
        LINKTYPE_IPV6 => (Some(6), data),
        LINKTYPE_LINUX_SLL => ethertype_at(data, 14, 16)?,
        LINKTYPE_LINUX_SLL2 => ethertype_at(data, 0, 20)?,
        _ => return Err(IpSkip::Other),
    };
    let version = version_hint.or_else(|| ip.first().map(|b| b >> 4)).ok_or(IpSkip::Truncated("IP header"))?;
    match version {
        4 => ipv4(ip, proto),
        6 => ipv6(ip, proto),
        _ => Err(IpSkip::Other),
    }
}

fn ethertype_at(data: &[u8], at: usize, header: usize) -> Result<(Option<u8>, &[u8]), IpSkip> {
    let t = data.get(at..at + 2).ok_or(IpSkip::Truncated("Linux cooked header"))?;
    let rest = data.get(header..).ok_or(IpSkip::Truncated("Linux cooked header"))?;
    match u16::from_be_bytes([t[0], t[1]]) {
        0x0800 => Ok((Some(4), rest)),
        0x86DD => Ok((Some(6), rest)),
        _ => Err(IpSkip::Other),
    }
}

fn ipv4(p: &[u8], proto: u8) -> Result<IpPacket<'_>, IpSkip> {
    let h = p.get(..20).ok_or(IpSkip::Truncated("IPv4 header"))?;
    if h[0] >> 4 != 4 {
        return Err(IpSkip::Other);
    }
    let ihl = usize::from(h[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let flags_frag = u16::from_be_bytes([h[6], h[7]]);
    if h[9] != proto {
        return Err(IpSkip::Other);
    }
    if flags_frag & 0x2000 != 0 || flags_frag & 0x1FFF != 0 {
        return Err(IpSkip::Fragment);
    }
    if ihl < 20 || total < ihl {
        return Err(IpSkip::Truncated("IPv4 header"));
    }
    // TSO captures carry total length 0; take what was captured then.
    let end = if total == 0 { p.len() } else { total.min(p.len()) };
    let body = p.get(ihl..end).ok_or(IpSkip::Truncated("IPv4 packet"))?;
    let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
    Ok(IpPacket { src, dst, body })
}

fn ipv6(p: &[u8], proto: u8) -> Result<IpPacket<'_>, IpSkip> {
    let h = p.get(..40).ok_or(IpSkip::Truncated("IPv6 header"))?;
    if h[0] >> 4 != 6 {
        return Err(IpSkip::Other);
    }
    if h[6] != proto {
        return Err(IpSkip::Other);
    }
    let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let body = &p[40..(40 + len).min(p.len())];
    let addr = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    Ok(IpPacket { src: addr(&h[8..24]), dst: addr(&h[24..40]), body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2];
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&1337u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn every_link_layer_yields_the_datagram() {
        let ip = ipv4_udp(b"smp!");
        let mut eth = vec![0; 12];
        eth.extend_from_slice(&[0x81, 0x00, 0, 1, 0x08, 0x00]);
        eth.extend_from_slice(&ip);
        let mut null = 2u32.to_le_bytes().to_vec();
        null.extend_from_slice(&ip);
        let mut sll = vec![0; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        for (lt, data) in [(LINKTYPE_ETHERNET, eth), (LINKTYPE_NULL, null), (LINKTYPE_RAW, ip.clone()), (LINKTYPE_LINUX_SLL, sll)] {
            let d = udp_datagram(lt, &data).unwrap_or_else(|e| panic!("{lt}: {e}"));
            assert_eq!((d.src.to_string(), d.dst.to_string(), d.payload), ("127.0.0.1:40000".into(), "127.0.0.2:1337".into(), &b"smp!"[..]));
        }
    }

    #[test]
    fn fragments_tcp_and_short_packets_are_skipped_with_a_reason() {
        let mut frag = ipv4_udp(b"x");
        frag[6] = 0x20;
        assert_eq!(udp_datagram(LINKTYPE_RAW, &frag), Err(IpSkip::Fragment));
        let mut tcp = ipv4_udp(b"x");
        tcp[9] = 6;
        assert_eq!(udp_datagram(LINKTYPE_RAW, &tcp), Err(IpSkip::Other));
        let ip = ipv4_udp(b"abcdef");
        assert!(matches!(udp_datagram(LINKTYPE_RAW, &ip[..30]), Err(IpSkip::Truncated(_))));
        for n in 0..ip.len() {
            let _ = udp_datagram(LINKTYPE_ETHERNET, &ip[..n]);
            let _ = udp_datagram(LINKTYPE_NULL, &ip[..n]);
            let _ = tcp_segment(LINKTYPE_RAW, &tcp[..n.min(tcp.len())]);
        }
    }

    #[test]
    fn a_tcp_segment_gives_its_ends_sequence_flags_and_payload() {
        let payload = b"GET /rpc HTTP/1.1\r\n";
        let total = 20 + 24 + payload.len();
        let mut p = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2];
        p.extend_from_slice(&50000u16.to_be_bytes());
        p.extend_from_slice(&80u16.to_be_bytes());
        p.extend_from_slice(&7u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&[0x60, 0x18, 0xff, 0xff, 0, 0, 0, 0, 2, 4, 5, 0xb4]);
        p.extend_from_slice(payload);
        let s = tcp_segment(LINKTYPE_RAW, &p).unwrap();
        assert_eq!((s.src.to_string(), s.dst.to_string(), s.seq, s.ack, s.syn, s.payload), ("127.0.0.1:50000".into(), "127.0.0.2:80".into(), 7, true, false, &payload[..]));
        assert_eq!(udp_datagram(LINKTYPE_RAW, &p), Err(IpSkip::Other));
    }
}

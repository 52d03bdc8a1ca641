//! MCUboot images as an SMP server reads them from a slot: the 32-byte
//! header, the TLV area after the body, and the SHA-256 TLV that state
//! read reports as the image's hash. Facts from `../shared/reference/smp.md`.
//!
//! Sans-IO, never panics: [`McubootImage::parse`] takes any bytes.
//! [`build_image`] makes a valid image (as `imgtool sign --pad-header`
//! would, without a signature) for the simulator's slot 0 and for tests.

use std::fmt;

pub const IMAGE_MAGIC: u32 = 0x96f3_b83d;
/// Header size as imgtool writes it by default.
pub const DEFAULT_HEADER_SIZE: u16 = 0x200;
pub const TLV_INFO_MAGIC: u16 = 0x6907;
pub const TLV_PROT_INFO_MAGIC: u16 = 0x6908;
pub const TLV_SHA256: u16 = 0x10;
const HEADER_FIELDS: usize = 32;

/// `major.minor.revision+build`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ImageVersion {
    pub major: u8,
    pub minor: u8,
    pub revision: u16,
    pub build: u32,
}

impl fmt::Display for ImageVersion {
    /// `maj.min.rev`, plus `.build` only when build is not 0 (as img_mgmt writes it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.revision)?;
        if self.build != 0 {
            write!(f, ".{}", self.build)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageVersion {
    type Err = String;
    /// `1.2.3` or `1.2.3.4` (also `1.2.3+4`, imgtool's form).
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(['.', '+']).collect();
        let n = |i: usize| parts.get(i).map(|p| p.parse::<u64>().map_err(|_| format!("`{s}`: `{p}` is not a number"))).transpose();
        let (Some(major), Some(minor)) = (n(0)?, n(1)?) else { return Err(format!("`{s}` is not a version (major.minor.revision[.build])")) };
        let (revision, build) = (n(2)?.unwrap_or(0), n(3)?.unwrap_or(0));
        if parts.len() > 4 || major > 255 || minor > 255 || revision > 65535 || build > u64::from(u32::MAX) {
            return Err(format!("`{s}` is out of range (u8.u8.u16.u32)"));
        }
        Ok(ImageVersion { major: major as u8, minor: minor as u8, revision: revision as u16, build: build as u32 })
    }
}

/// The fixed header at the start of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub load_addr: u32,
    pub hdr_size: u16,
    pub protect_tlv_size: u16,
    pub img_size: u32,
    pub flags: u32,
    pub version: ImageVersion,
}

/// Why bytes are not a usable image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("{0} bytes are fewer than the 32-byte image header")]
    Truncated(usize),
    #[error("header magic is {0:#010x}, not 0x96f3b83d")]
    BadMagic(u32),
    #[error("header size {0} is smaller than the 32-byte header")]
    BadHeaderSize(u16),
    #[error("the TLV area at {at} is past the {len} bytes there are")]
    NoTlvArea { at: usize, len: usize },
    #[error("TLV info magic at {at} is {magic:#06x}, not 0x6907")]
    BadTlvMagic { at: usize, magic: u16 },
    #[error("a TLV at {at} runs past the TLV area")]
    TlvOverrun { at: usize },
    #[error("no SHA-256 TLV")]
    NoHash,
}

impl ImageHeader {
    pub fn parse(b: &[u8]) -> Result<ImageHeader, ImageError> {
        let h: &[u8; HEADER_FIELDS] = b.get(..HEADER_FIELDS).and_then(|h| h.try_into().ok()).ok_or(ImageError::Truncated(b.len()))?;
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let magic = u32_at(0);
        if magic != IMAGE_MAGIC {
            return Err(ImageError::BadMagic(magic));
        }
        let hdr_size = u16_at(8);
        if usize::from(hdr_size) < HEADER_FIELDS {
            return Err(ImageError::BadHeaderSize(hdr_size));
        }
        Ok(ImageHeader {
            load_addr: u32_at(4),
            hdr_size,
            protect_tlv_size: u16_at(10),
            img_size: u32_at(12),
            flags: u32_at(16),
            version: ImageVersion { major: h[20], minor: h[21], revision: u16_at(22), build: u32_at(24) },
        })
    }

    pub fn encode(&self) -> [u8; HEADER_FIELDS] {
        let mut h = [0u8; HEADER_FIELDS];
        h[0..4].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&self.load_addr.to_le_bytes());
        h[8..10].copy_from_slice(&self.hdr_size.to_le_bytes());
        h[10..12].copy_from_slice(&self.protect_tlv_size.to_le_bytes());
        h[12..16].copy_from_slice(&self.img_size.to_le_bytes());
        h[16..20].copy_from_slice(&self.flags.to_le_bytes());
        h[20] = self.version.major;
        h[21] = self.version.minor;
        h[22..24].copy_from_slice(&self.version.revision.to_le_bytes());
        h[24..28].copy_from_slice(&self.version.build.to_le_bytes());
        h
    }
}

/// A parsed image: header, TLVs, the SHA-256 TLV, and whether it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McubootImage {
    pub header: ImageHeader,
    /// (type, value) of every TLV, protected ones first.
    pub tlvs: Vec<(u16, Vec<u8>)>,
    /// The SHA-256 TLV's value: the hash state read reports.
    pub hash: [u8; 32],
    /// Whether `hash` is the SHA-256 of header, body and protected TLVs.
    pub hash_matches: bool,
    /// Bytes from the start through the end of the TLV area.
    pub total_len: usize,
}

impl McubootImage {
    /// The image at the start of `b` (a slot's contents; bytes after the
    /// TLV area, such as the trailer, are ignored).
    pub fn parse(b: &[u8]) -> Result<McubootImage, ImageError> {
        let header = ImageHeader::parse(b)?;
        let mut at = usize::from(header.hdr_size) + header.img_size as usize;
        let hashed_end = at + usize::from(header.protect_tlv_size);
        let mut tlvs = Vec::new();
        if header.protect_tlv_size > 0 {
            let end = at + usize::from(header.protect_tlv_size);
            at = read_tlv_area(b, at, TLV_PROT_INFO_MAGIC, &mut tlvs)?;
            if at != end {
                return Err(ImageError::TlvOverrun { at });
            }
        }
        let total_len = read_tlv_area(b, at, TLV_INFO_MAGIC, &mut tlvs)?;
        let hash: [u8; 32] = tlvs
            .iter()
            .find(|(t, v)| *t == TLV_SHA256 && v.len() == 32)
            .and_then(|(_, v)| v.as_slice().try_into().ok())
            .ok_or(ImageError::NoHash)?;
        let hash_matches = b.get(..hashed_end).is_some_and(|covered| sha256(covered) == hash);
        Ok(McubootImage { header, tlvs, hash, hash_matches, total_len })
    }
}

/// Reads one TLV area (info header `magic`, `total` including itself) at `at`; returns its end.
fn read_tlv_area(b: &[u8], at: usize, magic: u16, tlvs: &mut Vec<(u16, Vec<u8>)>) -> Result<usize, ImageError> {
    let info = b.get(at..at.saturating_add(4)).ok_or(ImageError::NoTlvArea { at, len: b.len() })?;
    let got = u16::from_le_bytes([info[0], info[1]]);
    if got != magic {
        return Err(ImageError::BadTlvMagic { at, magic: got });
    }
    let end = at + usize::from(u16::from_le_bytes([info[2], info[3]]));
    if end > b.len() || end < at + 4 {
        return Err(ImageError::TlvOverrun { at });
    }
    let mut p = at + 4;
    while p < end {
        let Some(e) = b.get(p..p + 4).filter(|_| p + 4 <= end) else { return Err(ImageError::TlvOverrun { at: p }) };
        let (kind, len) = (u16::from_le_bytes([e[0], e[1]]), usize::from(u16::from_le_bytes([e[2], e[3]])));
        let value = b.get(p + 4..p + 4 + len).filter(|_| p + 4 + len <= end).ok_or(ImageError::TlvOverrun { at: p })?;
        tlvs.push((kind, value.to_vec()));
        p += 4 + len;
    }
    Ok(end)
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A valid unsigned image: a [`DEFAULT_HEADER_SIZE`] header (padded with
/// zeros), `body`, and a TLV area with the SHA-256 TLV.
pub fn build_image(version: ImageVersion, body: &[u8]) -> Vec<u8> {
    let header = ImageHeader { load_addr: 0, hdr_size: DEFAULT_HEADER_SIZE, protect_tlv_size: 0, img_size: body.len() as u32, flags: 0, version };
    let mut out = header.encode().to_vec();
    out.resize(usize::from(DEFAULT_HEADER_SIZE), 0);
    out.extend_from_slice(body);
    let hash = sha256(&out);
    out.extend_from_slice(&TLV_INFO_MAGIC.to_le_bytes());
    out.extend_from_slice(&(4u16 + 4 + 32).to_le_bytes());
    out.extend_from_slice(&TLV_SHA256.to_le_bytes());
    out.extend_from_slice(&32u16.to_le_bytes());
    out.extend_from_slice(&hash);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_image_parses_with_its_hash() {
        let v: ImageVersion = "1.2.3".parse().unwrap();
        let img = build_image(v, b"firmware body");
        let parsed = McubootImage::parse(&img).unwrap();
        assert_eq!(parsed.header.version, v);
        assert_eq!(parsed.header.hdr_size, 0x200);
        assert!(parsed.hash_matches);
        assert_eq!(parsed.total_len, img.len());
        assert_eq!(parsed.hash, sha256(&img[..0x200 + 13]));
        // Trailing bytes (a slot's erased rest) are ignored.
        let mut slot = img.clone();
        slot.extend([0xff; 64]);
        assert_eq!(McubootImage::parse(&slot).unwrap().hash, parsed.hash);
        // A changed body no longer matches its hash.
        let mut bad = img.clone();
        bad[0x200] ^= 1;
        assert!(!McubootImage::parse(&bad).unwrap().hash_matches);
    }

    #[test]
    fn broken_images_say_what_is_wrong() {
        let img = build_image(ImageVersion::default(), b"x");
        assert_eq!(McubootImage::parse(&img[..10]), Err(ImageError::Truncated(10)));
        let mut magic = img.clone();
        magic[0] = 0;
        assert!(matches!(McubootImage::parse(&magic), Err(ImageError::BadMagic(_))));
        assert!(matches!(McubootImage::parse(&img[..img.len() - 1]), Err(ImageError::TlvOverrun { .. })));
        assert!(matches!(McubootImage::parse(&img[..0x201]), Err(ImageError::NoTlvArea { .. })));
    }

    #[test]
    fn versions_print_as_img_mgmt_does() {
        assert_eq!("1.2.3".parse::<ImageVersion>().unwrap().to_string(), "1.2.3");
        assert_eq!("1.2.3+4".parse::<ImageVersion>().unwrap().to_string(), "1.2.3.4");
        assert!("256.0.0".parse::<ImageVersion>().is_err());
        assert!("1".parse::<ImageVersion>().is_err());
        assert!("1.2.3.4.5".parse::<ImageVersion>().is_err());
    }
}

//! One MCUboot image's two slots as an SMP server and MCUboot see them:
//! what each slot holds, what the secondary asks of the next boot (TEST or
//! PERM), whether the running image is confirmed, and the swap MCUboot
//! runs at each boot. Facts from `../shared/reference/smp.md`.
//!
//! Slots hold only what was written (an erased slot is empty), so a
//! thousand simulated devices cost the bytes uploaded to them, not their
//! slot sizes.

use crate::protocol::mcuboot::McubootImage;

/// Slot 0 runs; slot 1 receives uploads.
pub const PRIMARY: usize = 0;
pub const SECONDARY: usize = 1;

/// What the secondary slot's trailer asks of the next boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Run it once; revert unless it is confirmed.
    Test,
    /// Run it for good.
    Perm,
}

/// The swap MCUboot ran at a boot (MCUboot's `BOOT_SWAP_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapType {
    None,
    Test,
    Perm,
    Revert,
    /// The image asked for did not validate; it was not swapped in.
    Fail,
}

/// A slot's flags as state read reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotFlags {
    pub active: bool,
    pub confirmed: bool,
    pub pending: bool,
    pub permanent: bool,
    pub bootable: bool,
}

/// Why a flash operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    #[error("a write to {end} bytes is past the {size}-byte slot")]
    PastSlot { end: usize, size: usize },
}

/// What the slots hold at start besides slot 0's image: a device caught in the middle
/// of an update (a scenario's `secondary_version`, `pending`, `confirmed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Slot 1's contents: an uploaded update, or the image a revert brings back.
    pub secondary: Option<Vec<u8>>,
    /// Slot 1 asked of the next boot.
    pub pending: Option<Pending>,
    /// false: the running image is on test and the next boot reverts to slot 1's.
    pub confirmed: bool,
}

impl Default for SlotState {
    fn default() -> Self {
        SlotState { secondary: None, pending: None, confirmed: true }
    }
}

#[derive(Debug, Clone)]
pub struct Firmware {
    slot_size: usize,
    /// What each slot holds from offset 0 (all of it that was written).
    slots: [Vec<u8>; 2],
    pending: Option<Pending>,
    /// The running image is confirmed (image_ok); when not, the next boot reverts.
    confirmed: bool,
    boots: u32,
}

impl Firmware {
    /// Slot 0 holds `image`, confirmed; slot 1 is erased.
    pub fn new(slot_size: usize, image: Vec<u8>) -> Firmware {
        Firmware { slot_size, slots: [image, Vec::new()], pending: None, confirmed: true, boots: 0 }
    }

    /// Slot 0 holds `image` and the rest is as `state` says; Err when MCUboot could not
    /// be in that state (a pending or revert with nothing in slot 1, a running test image
    /// with another pending) or slot 1's image does not fit.
    pub fn with_state(slot_size: usize, image: Vec<u8>, state: SlotState) -> Result<Firmware, String> {
        let mut fw = Firmware::new(slot_size, image);
        let SlotState { secondary, pending, confirmed } = state;
        if let Some(s) = secondary {
            fw.write(SECONDARY, 0, &s).map_err(|e| format!("slot 1: {e}"))?;
        } else if pending.is_some() || !confirmed {
            return Err("a pending test or an unconfirmed running image needs an image in slot 1".into());
        }
        if pending.is_some() && !confirmed {
            return Err("an unconfirmed running image (on test) cannot have another image pending: MCUboot refuses the upload until it is confirmed".into());
        }
        fw.pending = pending;
        fw.confirmed = confirmed;
        Ok(fw)
    }

    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// The bytes written to a slot.
    pub fn contents(&self, slot: usize) -> &[u8] {
        self.slots.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The image in a slot, when its header and TLVs parse.
    pub fn image(&self, slot: usize) -> Option<McubootImage> {
        McubootImage::parse(self.contents(slot)).ok()
    }

    /// The slot whose image has this SHA-256 TLV.
    pub fn slot_with_hash(&self, hash: &[u8]) -> Option<usize> {
        (0..2).find(|&s| self.image(s).is_some_and(|i| i.hash == hash))
    }

    pub fn pending(&self) -> Option<Pending> {
        self.pending
    }

    /// Whether the running image is confirmed.
    pub fn confirmed(&self) -> bool {
        self.confirmed
    }

    /// Whether the secondary may be erased and written: not while it is
    /// asked for at the next boot, nor while it holds the image a revert
    /// would bring back.
    pub fn secondary_free(&self) -> bool {
        self.pending.is_none() && self.confirmed
    }

    pub fn erase(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Vec::new();
        }
        if slot == SECONDARY {
            self.pending = None;
        }
    }

    /// Writes `bytes` at `off` (erased bytes before it read 0xff).
    pub fn write(&mut self, slot: usize, off: usize, bytes: &[u8]) -> Result<(), FlashError> {
        let end = off.saturating_add(bytes.len());
        if end > self.slot_size {
            return Err(FlashError::PastSlot { end, size: self.slot_size });
        }
        let Some(s) = self.slots.get_mut(slot) else { return Ok(()) };
        if s.len() < end {
            s.resize(end, 0xff);
        }
        s[off..end].copy_from_slice(bytes);
        Ok(())
    }

    /// Marks the secondary for the next boot.
    pub fn set_pending(&mut self, p: Pending) {
        self.pending = Some(p);
    }

    /// Confirms the running image (writes image_ok): no revert.
    pub fn confirm(&mut self) {
        self.confirmed = true;
    }

    /// A reset: MCUboot's swap, as it runs at boot.
    pub fn boot(&mut self) -> SwapType {
        self.boots += 1;
        match self.pending.take() {
            Some(p) => {
                if !self.image(SECONDARY).is_some_and(|i| i.hash_matches) {
                    // MCUboot refuses an image that does not validate and erases it.
                    self.slots[SECONDARY].clear();
                    return SwapType::Fail;
                }
                self.slots.swap(PRIMARY, SECONDARY);
                self.confirmed = p == Pending::Perm;
                if p == Pending::Perm {
                    SwapType::Perm
                } else {
                    SwapType::Test
                }
            }
            None if !self.confirmed => {
                self.slots.swap(PRIMARY, SECONDARY);
                self.confirmed = true;
                SwapType::Revert
            }
            None => SwapType::None,
        }
    }

    /// A slot's flags: the active slot is `confirmed` unless the next boot
    /// reverts; the other is `pending` (+ `permanent`) when asked for, or
    /// `confirmed` when it is what a revert brings back.
    pub fn flags(&self, slot: usize) -> SlotFlags {
        let bootable = self.image(slot).is_some();
        if slot == PRIMARY {
            return SlotFlags { active: true, confirmed: self.confirmed, bootable, ..Default::default() };
        }
        match self.pending {
            Some(p) => SlotFlags { pending: true, permanent: p == Pending::Perm, bootable, ..Default::default() },
            None => SlotFlags { confirmed: !self.confirmed, bootable, ..Default::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::mcuboot::{build_image, ImageVersion};

    fn v(s: &str) -> ImageVersion {
        s.parse().unwrap()
    }

    fn running(fw: &Firmware) -> ImageVersion {
        fw.image(PRIMARY).unwrap().header.version
    }

    #[test]
    fn a_device_caught_mid_update_boots_as_it_would_have() {
        let image = |ver: &str| build_image(v(ver), ver.as_bytes());
        // On test and unconfirmed: the next boot reverts to slot 1's.
        let state = SlotState { secondary: Some(image("1.0.0")), pending: None, confirmed: false };
        let mut fw = Firmware::with_state(0x40000, image("2.0.0"), state).unwrap();
        assert_eq!((fw.flags(PRIMARY).confirmed, fw.flags(SECONDARY).confirmed), (false, true));
        assert_eq!(fw.boot(), SwapType::Revert);
        assert_eq!(running(&fw), v("1.0.0"));
        // An update pending for good: the next boot swaps it in, confirmed.
        let state = SlotState { secondary: Some(image("3.0.0")), pending: Some(Pending::Perm), confirmed: true };
        let mut fw = Firmware::with_state(0x40000, image("2.0.0"), state).unwrap();
        assert!(fw.flags(SECONDARY).permanent);
        assert_eq!(fw.boot(), SwapType::Perm);
        assert_eq!((running(&fw), fw.confirmed()), (v("3.0.0"), true));
        // States MCUboot cannot be in.
        assert!(Firmware::with_state(0x40000, image("2.0.0"), SlotState { secondary: None, pending: Some(Pending::Test), confirmed: true }).is_err());
        assert!(Firmware::with_state(0x40000, image("2.0.0"), SlotState { secondary: None, pending: None, confirmed: false }).is_err());
        assert!(Firmware::with_state(0x40000, image("2.0.0"), SlotState { secondary: Some(image("1.0.0")), pending: Some(Pending::Test), confirmed: false }).is_err());
        assert!(Firmware::with_state(16, image("2.0.0"), SlotState { secondary: Some(image("1.0.0")), pending: None, confirmed: true }).is_err());
    }

    fn with_upload(version: &str) -> Firmware {
        let mut fw = Firmware::new(0x40000, build_image(v("1.0.0"), b"one"));
        fw.write(SECONDARY, 0, &build_image(v(version), b"two")).unwrap();
        fw
    }

    #[test]
    fn an_unconfirmed_test_image_is_reverted_on_the_next_boot() {
        let mut fw = with_upload("2.0.0");
        fw.set_pending(Pending::Test);
        assert_eq!(fw.flags(SECONDARY), SlotFlags { pending: true, bootable: true, ..Default::default() });
        assert_eq!(fw.boot(), SwapType::Test);
        assert_eq!(running(&fw), v("2.0.0"));
        assert_eq!(fw.flags(PRIMARY), SlotFlags { active: true, bootable: true, ..Default::default() }, "not confirmed: the next boot reverts");
        assert!(fw.flags(SECONDARY).confirmed, "the revert target");
        assert!(!fw.secondary_free());
        assert_eq!(fw.boot(), SwapType::Revert);
        assert_eq!(running(&fw), v("1.0.0"));
        assert_eq!(fw.boot(), SwapType::None);
    }

    #[test]
    fn a_confirmed_test_image_stays() {
        let mut fw = with_upload("2.0.0");
        fw.set_pending(Pending::Test);
        fw.boot();
        fw.confirm();
        assert!(fw.flags(PRIMARY).confirmed);
        assert_eq!(fw.boot(), SwapType::None);
        assert_eq!(running(&fw), v("2.0.0"));
        assert!(fw.secondary_free());
    }

    #[test]
    fn a_permanent_request_needs_no_confirmation() {
        let mut fw = with_upload("3.1.0");
        fw.set_pending(Pending::Perm);
        assert_eq!(fw.flags(SECONDARY), SlotFlags { pending: true, permanent: true, bootable: true, ..Default::default() });
        assert_eq!(fw.boot(), SwapType::Perm);
        assert_eq!(fw.boot(), SwapType::None);
        assert_eq!(running(&fw), v("3.1.0"));
    }

    #[test]
    fn an_image_that_does_not_validate_is_not_swapped_in() {
        let mut fw = with_upload("2.0.0");
        fw.write(SECONDARY, 0x200, b"X").unwrap();
        fw.set_pending(Pending::Test);
        assert_eq!(fw.boot(), SwapType::Fail);
        assert_eq!(running(&fw), v("1.0.0"));
        assert!(fw.image(SECONDARY).is_none());
    }

    #[test]
    fn writes_stay_inside_the_slot() {
        let mut fw = Firmware::new(16, Vec::new());
        assert_eq!(fw.write(SECONDARY, 10, &[0; 7]), Err(FlashError::PastSlot { end: 17, size: 16 }));
        fw.write(SECONDARY, 4, &[1, 2]).unwrap();
        assert_eq!(fw.contents(SECONDARY), [0xff, 0xff, 0xff, 0xff, 1, 2]);
    }
}
